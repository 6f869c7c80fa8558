"""The sharding units of the urt families: `layer_classes` names each family's decoder-layer and vision-block
classes, which urt.models.fsdp (FSDP2, conf/trainer/fsdp.yaml) makes its units and urt.plan counts. The
FSDP1 helpers below (`wrap_policy`, `checkpoint_policy`, `mixed_precision`) serve Lightning's FSDPStrategy
for whoever configures it by hand; urt's own sharded strategy is urt.stages.sharded.

FSDP shards a model unit by unit: every module the `auto_wrap_policy` selects becomes one unit whose
parameters are gathered just for its forward/backward, the rest stays in the root unit. For the
vision-language models here the units are the transformer blocks: the language model's decoder layers
(where the parameters, the trained ones, and the activations are) and the vision tower's blocks (frozen by
default, but a large share of the weights: ~0.7B of Qwen2.5-VL-7B). Activation checkpointing applies to
the decoder layers only: the frozen vision tower keeps no activations for backward anyway.

The block classes are those transformers itself keeps whole when splitting a model across devices
(each model's `_no_split_modules`); `tests/test_ddp.py` checks them against the tiny model of every family.
"""

from __future__ import annotations

import importlib

from urt.errors import UrtError

# family -> part -> (transformers module, class name)
LAYERS: dict[str, dict[str, tuple[str, str]]] = {
    "qwen2_5_vl": {
        "decoder": ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLDecoderLayer"),
        "vision": ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLVisionBlock"),
    },
    "qwen3_vl": {
        "decoder": ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLTextDecoderLayer"),
        "vision": ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionBlock"),
    },
    "qwen3_5": {
        "decoder": ("transformers.models.qwen3_5.modeling_qwen3_5", "Qwen3_5DecoderLayer"),
        "vision": ("transformers.models.qwen3_5.modeling_qwen3_5", "Qwen3_5VisionBlock"),
    },
    # LLaVA-OneVision as released (UnifiedReward-7b / -Think-7b): a Qwen2 language model, a SigLIP tower
    "llava_onevision": {
        "decoder": ("transformers.models.qwen2.modeling_qwen2", "Qwen2DecoderLayer"),
        "vision": ("transformers.models.siglip.modeling_siglip", "SiglipEncoderLayer"),
    },
}
PARTS = ("decoder", "vision")


def layer_classes(family: str, parts: tuple[str, ...] | list[str] = PARTS) -> set[type]:
    """The block classes of `family` for the given parts ("decoder": the language model's decoder
    layers, "vision": the vision tower's blocks)."""
    if family not in LAYERS:
        raise UrtError(f"no FSDP layer classes for family {family!r}; known: {', '.join(LAYERS)}")
    out = set()
    for part in parts:
        if part not in PARTS:
            raise UrtError(f"unknown model part {part!r}; known: {', '.join(PARTS)}")
        module, name = LAYERS[family][part]
        try:
            out.add(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError) as e:
            import transformers

            raise UrtError(f"family {family!r}: transformers {transformers.__version__} has no {module}.{name} "
                           f"(FSDP wrapping); upgrade transformers") from e
    return out


def wrap_policy(family: str, vision: bool = True):
    """FSDP `auto_wrap_policy`: one unit per decoder layer (and per vision block unless vision=False)."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return ModuleWrapPolicy(layer_classes(family, PARTS if vision else ("decoder",)))


def checkpoint_policy(family: str):
    """`activation_checkpointing_policy` (Lightning's FSDPStrategy): the decoder layers."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return ModuleWrapPolicy(layer_classes(family, ("decoder",)))


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def mixed_precision(param: str = "bf16", reduce: str = "fp32", buffer: str = "fp32"):
    """FSDP `MixedPrecision` from dtype names (bf16 | fp16 | fp32). The default computes in bf16 but
    reduces gradients in fp32 and keeps buffers in fp32: Lightning's own "bf16-mixed" for FSDP casts all
    three to bf16, which rounds the rotary-embedding frequencies (a buffer) to 3 significant digits."""
    import torch
    from torch.distributed.fsdp import MixedPrecision

    def dtype(name: str):
        if name not in DTYPES:
            raise UrtError(f"unknown dtype {name!r} for FSDP mixed precision; known: {', '.join(DTYPES)}")
        return getattr(torch, DTYPES[name])

    return MixedPrecision(param_dtype=dtype(param), reduce_dtype=dtype(reduce), buffer_dtype=dtype(buffer))


def check_wrapping(model, family: str) -> None:
    """Raise when `model` contains none of its family's decoder layer classes: FSDP would then wrap
    nothing (one unit holding every weight on every rank, no memory saved) and silently so."""
    classes = tuple(layer_classes(family, ("decoder",)))
    if not any(isinstance(m, classes) for m in model.modules()):
        names = ", ".join(c.__name__ for c in classes)
        raise UrtError(f"FSDP: the model has no {names} module although model.family={family!r}; its language "
                       f"model is another architecture, so the wrap policy of conf/trainer/fsdp.yaml "
                       f"(urt.models.sharding) would shard nothing")
