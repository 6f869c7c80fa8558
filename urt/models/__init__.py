"""Model layer: families, the tiny offline models, loading / freezing / LoRA / saving."""

from urt.models.families import FAMILIES, FamilySpec, family_from_config, get_family
from urt.models.loading import ModelBundle, choose_attn_implementation, load_model, save_pretrained
from urt.models.tiny import build_tiny

__all__ = [
    "FAMILIES",
    "FamilySpec",
    "ModelBundle",
    "build_tiny",
    "choose_attn_implementation",
    "family_from_config",
    "get_family",
    "load_model",
    "save_pretrained",
]
