"""The sizes the memory plan needs, from a model's config alone (no weight is read).

Where the config comes from (`model_config`): a local checkpoint folder's config.json; a hub id already in
the Hugging Face cache (offline: `local_files_only`); else, so that `urt plan` answers offline for the
released checkpoints, the configs of the released sizes shipped with urt (`urt/plan/configs/*.json`: the
architecture fields of each config.json, see docs/scaling.md for their sources); `tiny` is urt's tiny
model's config. The parameters are then counted exactly, per tensor and per part, on a model instantiated
on the meta device (no memory, a second at most), with the run's freeze flags applied.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from urt.errors import UrtError

# hub id (or a checkpoint folder's name) -> shipped config (the released sizes and the UnifiedReward releases)
RELEASED = {
    "Qwen/Qwen2.5-VL-7B-Instruct": "qwen2_5_vl_7b", "CodeGoat24/UnifiedReward-Think-qwen-7b": "qwen2_5_vl_7b",
    "Qwen/Qwen3-VL-2B-Instruct": "qwen3_vl_2b", "CodeGoat24/UnifiedReward-Think-qwen3vl-2b": "qwen3_vl_2b",
    "Qwen/Qwen3-VL-4B-Instruct": "qwen3_vl_4b", "CodeGoat24/UnifiedReward-Think-qwen3vl-4b": "qwen3_vl_4b",
    "Qwen/Qwen3-VL-8B-Instruct": "qwen3_vl_8b", "CodeGoat24/UnifiedReward-Think-qwen3vl-8b": "qwen3_vl_8b",
    "Qwen/Qwen3-VL-32B-Instruct": "qwen3_vl_32b", "CodeGoat24/UnifiedReward-Think-qwen3vl-32b": "qwen3_vl_32b",
    "Qwen/Qwen3.5-4B": "qwen3_5_4b", "CodeGoat24/UnifiedReward-Think-qwen35-4b": "qwen3_5_4b",
    "Qwen/Qwen3.5-9B": "qwen3_5_9b", "CodeGoat24/UnifiedReward-Think-qwen35-9b": "qwen3_5_9b",
    "Qwen/Qwen3.5-27B": "qwen3_5_27b", "CodeGoat24/UnifiedReward-Think-qwen35-27b": "qwen3_5_27b",
    "lmms-lab/llava-onevision-qwen2-7b-ov": "llava_onevision_7b",
    "UnifiedReward-7b-hf": "llava_onevision_7b", "UnifiedReward-Think-7b-hf": "llava_onevision_7b",
}


def shipped_config(name: str) -> dict:
    """The shipped config.json fields of a released size (`RELEASED` value)."""
    text = resources.files("urt.plan").joinpath("configs", f"{name}.json").read_text()
    return json.loads(text)


def model_config(name_or_path: str, family: str | None = None):
    """The transformers config of `name_or_path` (see the module docstring); UrtError naming
    model.name_or_path when none of the sources has it."""
    from transformers import AutoConfig

    name = str(name_or_path)
    if name == "tiny":
        from urt.models.tiny import load_tiny_tokenizer, tiny_config

        if not family:
            raise UrtError("model.name_or_path=tiny needs model.family to plan")
        return tiny_config(family, load_tiny_tokenizer(family))
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path)
    key = name if name in RELEASED else path.name if path.name in RELEASED else None
    if not path.exists() and "/" in name and not name.startswith(("/", ".", "~")):
        try:  # a hub id already downloaded
            return AutoConfig.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError):
            pass
    if key is None:
        raise UrtError(f"model.name_or_path={name!r}: no config to plan from (not a checkpoint folder with a "
                       f"config.json, not in the Hugging Face cache, not a released size urt ships: "
                       f"{', '.join(sorted({k for k in RELEASED if '/' in k}))}); an earlier stage's output that "
                       f"does not exist yet: plan with --model NAME_OR_PATH of its base model")
    d = shipped_config(RELEASED[key])
    return AutoConfig.for_model(d.pop("model_type"), **d)


@dataclass
class Tensor:
    """One parameter as the plan sees it: its shape, whether it trains, whether FSDP2 shards it."""

    name: str
    shape: tuple[int, ...]
    trainable: bool
    sharded: bool  # False: kept replicated (the frozen vision tower and projector, urt.models.fsdp)
    unit: str  # "decoder.N", "vision.N" or "root"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def local_numel(self, world: int) -> int:
        """Elements rank 0 stores under FSDP2 (dim 0 split in `world` chunks, the first ones full)."""
        if not self.sharded or world == 1 or not self.shape:
            return self.numel
        return math.ceil(self.shape[0] / world) * math.prod(self.shape[1:])


@dataclass
class ModelSizes:
    """What the plan needs of one model: every parameter tensor, and the architecture's dimensions."""

    family: str
    tensors: list[Tensor]
    hidden: int
    layers: int  # decoder layers
    attention_layers: int  # of them, with a KV cache (Qwen3.5: one in 4; the rest linear attention)
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    linear_state: int  # elements of one sequence's recurrent state in one linear-attention layer (Qwen3.5)
    linear_conv: int  # elements of its convolution state

    def count(self, trainable: bool | None = None) -> int:
        return sum(t.numel for t in self.tensors if trainable is None or t.trainable == trainable)

    def unit_numel(self, prefix: str) -> int:
        """The largest unit whose name starts with `prefix` (one decoder layer, the root)."""
        sizes: dict[str, int] = {}
        for t in self.tensors:
            if t.unit.startswith(prefix) and t.sharded:
                sizes[t.unit] = sizes.get(t.unit, 0) + t.numel
        return max(sizes.values(), default=0)


def model_sizes(model_cfg: dict) -> ModelSizes:
    """`ModelSizes` of a `cfg.model` dict (name_or_path, family, freeze_* flags) without loading weights."""
    import torch

    from urt.models.families import family_from_model_type, get_family
    from urt.models.loading import set_trainable
    from urt.models.sharding import layer_classes

    if model_cfg.get("lora"):
        raise UrtError("the memory plan covers full training; model.lora is set (LoRA trains with trainer=ddp)")
    config = model_config(model_cfg["name_or_path"], model_cfg.get("family"))
    family = model_cfg.get("family") or family_from_model_type(config.model_type,
                                                               getattr(config, "architectures", None))
    spec = get_family(family)
    with torch.device("meta"):
        model = spec.model_cls()._from_config(config)  # the class urt loads the family with
    set_trainable(model, family, vision=not model_cfg.get("freeze_vision", True),
                  projector=not model_cfg.get("freeze_projector", True),
                  language=not model_cfg.get("freeze_language", False))
    dec, vis = tuple(layer_classes(family, ("decoder",))), tuple(layer_classes(family, ("vision",)))
    unit_of: dict[int, str] = {}
    trained_blocks = set()
    for kind, classes in (("decoder", dec), ("vision", vis)):
        for i, m in enumerate(x for x in model.modules() if isinstance(x, classes)):
            ps = list(m.parameters())
            if kind == "vision" and any(p.requires_grad for p in ps):
                trained_blocks.add(f"vision.{i}")
            for p in ps:
                unit_of[id(p)] = f"{kind}.{i}"
    tensors = []
    for n, p in model.named_parameters():
        unit = unit_of.get(id(p), "root")
        if unit.startswith("vision.") and unit not in trained_blocks:
            unit = "root"
        replicated = not p.requires_grad and spec.part_of(n) in ("vision", "projector") and unit == "root"
        tensors.append(Tensor(n, tuple(p.shape), bool(p.requires_grad), not replicated, unit))
    text = config.get_text_config()
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    types = list(getattr(text, "layer_types", None) or [])
    n_layers = int(text.num_hidden_layers)
    attn_layers = sum(t != "linear_attention" for t in types) if types else n_layers
    state = conv = 0
    if attn_layers < n_layers:  # gated DeltaNet: per value head a (key dim x value dim) state, fp32
        nv, dk, dv = text.linear_num_value_heads, text.linear_key_head_dim, text.linear_value_head_dim
        nk = text.linear_num_key_heads
        state = nv * dk * dv
        conv = (2 * nk * dk + nv * dv) * int(text.linear_conv_kernel_dim)
    return ModelSizes(family=family, tensors=tensors, hidden=int(text.hidden_size), layers=n_layers,
                      attention_layers=attn_layers, heads=heads, kv_heads=int(text.num_key_value_heads),
                      head_dim=head_dim, intermediate=int(text.intermediate_size), vocab=int(text.vocab_size),
                      linear_state=int(state), linear_conv=int(conv))
