"""Model layer: families, the tiny offline models, loading / freezing / LoRA / saving."""

from urt.lazy import lazy_exports

# Resolved on first use: loading imports torch and transformers, which `urt --help` never needs.
__getattr__, __all__ = lazy_exports(__name__, {
    "urt.models.families": ("FAMILIES", "FamilySpec", "family_from_config", "get_family"),
    "urt.models.loading": ("ModelBundle", "choose_attn_implementation", "load_model", "save_pretrained"),
    "urt.models.tiny": ("build_tiny",),
})
