"""The model families urt knows: which HF classes, which config.json `model_type`, where the vision
tower / projector / language model sit (parameter-name prefixes of the `...ForConditionalGeneration`
model in transformers 5.x), which prompt template set the released checkpoints use."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

from urt.errors import UrtError


@dataclass(frozen=True)
class FamilySpec:
    name: str
    model_types: tuple[str, ...]  # config.json "model_type" values of this family
    model_class: str  # transformers class (AutoModelForImageTextToText maps model_type to it)
    processor_class: str
    hub_ids: tuple[str, ...]  # released UnifiedReward-Think checkpoints of this family
    prompt_set: str  # default template set in urt.prompts ("paper" or "qwen3")
    # Parameter-name prefixes (as in model.named_parameters()). Projector prefixes win over vision ones.
    vision_prefixes: tuple[str, ...]
    projector_prefixes: tuple[str, ...]
    language_prefixes: tuple[str, ...]
    # Regex (peft full-match) for the language model's attention projections: LoRA's default targets.
    lora_target_regex: str = r".*language_model\.layers\.\d+\.self_attn\.({names})"
    packing_safe: bool = True  # padding-free packing isolates samples on CPU/sdpa (with urt.models.hybrid's hooks)
    notes: str = ""

    @property
    def supported(self) -> bool:
        """True when the installed transformers has the model class."""
        try:
            return hasattr(importlib.import_module("transformers"), self.model_class)
        except ImportError:  # pragma: no cover
            return False

    def model_cls(self):
        import transformers

        if not self.supported:
            raise UrtError(
                f"family {self.name!r} needs transformers.{self.model_class}, which the installed "
                f"transformers {transformers.__version__} does not have; upgrade transformers"
            )
        return getattr(transformers, self.model_class)

    def part_of(self, param_name: str) -> str:
        """'projector', 'vision', 'language' or 'other' for a parameter name."""
        if param_name.startswith("base_model.model."):  # a peft-wrapped model
            param_name = param_name[len("base_model.model."):]
        for part, prefixes in (
            ("projector", self.projector_prefixes),
            ("vision", self.vision_prefixes),
            ("language", self.language_prefixes),
        ):
            if any(param_name.startswith(p) for p in prefixes):
                return part
        return "other"


_QWEN_LANGUAGE = ("model.language_model.", "lm_head.")

FAMILIES: dict[str, FamilySpec] = {
    "llava_onevision": FamilySpec(
        name="llava_onevision",
        model_types=("llava_onevision",),
        model_class="LlavaOnevisionForConditionalGeneration",
        processor_class="LlavaOnevisionProcessor",
        hub_ids=("CodeGoat24/UnifiedReward-Think-7b",),
        prompt_set="paper",
        vision_prefixes=("model.vision_tower.",),
        projector_prefixes=("model.multi_modal_projector.", "model.image_newline"),
        language_prefixes=_QWEN_LANGUAGE,
        notes="released checkpoints ship in the original LLaVA-NeXT layout: run `urt models convert`",
    ),
    "qwen2_5_vl": FamilySpec(
        name="qwen2_5_vl",
        model_types=("qwen2_5_vl",),
        model_class="Qwen2_5_VLForConditionalGeneration",
        processor_class="Qwen2_5_VLProcessor",
        hub_ids=("CodeGoat24/UnifiedReward-Think-qwen-7b",),
        prompt_set="paper",
        vision_prefixes=("model.visual.",),
        projector_prefixes=("model.visual.merger.",),
        language_prefixes=_QWEN_LANGUAGE,
    ),
    "qwen3_vl": FamilySpec(
        name="qwen3_vl",
        model_types=("qwen3_vl",),
        model_class="Qwen3VLForConditionalGeneration",
        processor_class="Qwen3VLProcessor",
        hub_ids=(
            "CodeGoat24/UnifiedReward-Think-qwen3vl-2b",
            "CodeGoat24/UnifiedReward-Think-qwen3vl-4b",
            "CodeGoat24/UnifiedReward-Think-qwen3vl-8b",
            "CodeGoat24/UnifiedReward-Think-qwen3vl-32b",
        ),
        prompt_set="qwen3",
        vision_prefixes=("model.visual.",),
        projector_prefixes=("model.visual.merger.", "model.visual.deepstack_merger_list."),
        language_prefixes=_QWEN_LANGUAGE,
    ),
    "qwen3_5": FamilySpec(
        name="qwen3_5",
        model_types=("qwen3_5",),
        model_class="Qwen3_5ForConditionalGeneration",
        processor_class="Qwen3VLProcessor",  # transformers maps model_type qwen3_5 to Qwen3VLProcessor
        # Names as the project's release list gives them (-qwen35-4b/9b/27b); not checked against a hub here.
        hub_ids=(
            "CodeGoat24/UnifiedReward-Think-qwen35-4b",
            "CodeGoat24/UnifiedReward-Think-qwen35-9b",
            "CodeGoat24/UnifiedReward-Think-qwen35-27b",
        ),
        prompt_set="qwen3",
        vision_prefixes=("model.visual.",),
        projector_prefixes=("model.visual.merger.", "model.visual.deepstack_merger_list."),
        language_prefixes=_QWEN_LANGUAGE,
        notes="hybrid linear/full attention: packed samples start from zero linear-attention states through "
        "urt.models.hybrid.isolate_packed_samples (load_model and make_collator install it); without flash-linear-attention "
        "and causal-conv1d the linear-attention layers run transformers' slow torch fallback",
    ),
}

# The original LLaVA-NeXT layout (model_type "llava" or "llava_qwen", architectures
# LlavaQwenForCausalLM) is how the released UnifiedReward-7b / UnifiedReward-Think-7b ship; HF's own
# LLaVA-1.5 format (model_type "llava", LlavaForConditionalGeneration) is simply not a urt family.


def known_families() -> str:
    return ", ".join(FAMILIES)


def get_family(name: str) -> FamilySpec:
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise UrtError(f"unknown model family {name!r}; known families: {known_families()}") from None


def family_from_model_type(model_type: str | None, architectures: list[str] | None = None, *, source: str = "config") -> str:
    archs = [str(a) for a in architectures or []]
    original_llava = any(a.startswith(("LlavaQwen", "LlavaLlama", "LlavaMistral", "LlavaMixtral")) for a in archs)
    if original_llava or model_type == "llava_qwen" or (
        model_type == "llava" and not any(a.endswith("ForConditionalGeneration") for a in archs)
    ):
        raise UrtError(
            f"{source} is a checkpoint in the original LLaVA-NeXT layout (model_type {model_type!r}, "
            f"architectures {architectures}); transformers cannot load it directly. Convert it first: "
            f"urt models convert --from llava_next IN --out OUT"
        )
    for spec in FAMILIES.values():
        if model_type in spec.model_types:
            return spec.name
    raise UrtError(
        f"{source} has model_type {model_type!r}, which is not a known family; known families: "
        f"{known_families()} (model types: {', '.join(t for s in FAMILIES.values() for t in s.model_types)})"
    )


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UrtError(f"{folder}: config.json not found (expected {path})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UrtError(f"{path}: cannot read config.json as JSON ({err})") from None
    if not isinstance(data, dict):
        raise UrtError(f"{path}: config.json is not a JSON object")
    return data


def family_from_config(folder: str | Path) -> str:
    """The family of a local checkpoint folder, from its config.json `model_type`."""
    cfg = read_config(folder)
    return family_from_model_type(
        cfg.get("model_type"), cfg.get("architectures"), source=str(Path(folder) / "config.json")
    )
