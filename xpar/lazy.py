"""Package attributes that import their module on first use.

For packages whose eager imports would be circular (config nodes import
xpar.config.checks; xpar.moe imports xpar.models.mlp).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_getattr(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A module-level __getattr__ serving `exports` (name -> submodule of `package`)."""

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    return __getattr__
