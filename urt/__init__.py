"""urt — unified multimodal chain-of-thought reward models (UnifiedReward-Think)."""

__version__ = "0.1.0"
