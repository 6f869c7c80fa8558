"""Package exports that resolve on first use (PEP 562), so that importing a package — as every `urt`
subcommand's registration does — does not import torch, transformers or torchmetrics until needed."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]]) -> tuple[Callable[[str], Any], list[str]]:
    """(`__getattr__`, `__all__`) for `package` re-exporting `exports` ({module: names}); a name is imported
    from its module on first access and then cached in the package's namespace."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        setattr(importlib.import_module(package), name, value)
        return value

    return __getattr__, sorted(where)
