"""urt — unified multimodal chain-of-thought reward models (UnifiedReward-Think)."""

__version__ = "0.1.0"

__all__ = ["Judge", "__version__"]


def __getattr__(name: str):
    # Lazy: `import urt` stays light (no torch / transformers) until the judge is asked for.
    if name == "Judge":
        from urt.judge import Judge

        return Judge
    raise AttributeError(f"module 'urt' has no attribute {name!r}")
