"""A registry of named variants (routers, attentions, ...) that fills itself from a package.

Each module of the package registers its classes with `@registry.register`; `load()`
imports every module, so adding a variant never means editing a central list.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T", bound=type)


@dataclass
class NoOptions:
    """The options of a variant that has none: its options mapping must be empty."""


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, T] = {}

    def register(self, cls: T) -> T:
        name = cls.name
        have = self._classes.get(name)
        if have is not None and have is not cls:
            raise ValueError(f"two {self.kind}s are registered as {name!r}: {have} and {cls}")
        self._classes[name] = cls
        return cls

    def load(self, package: str, path: list[str], skip: tuple[str, ...] = ("base",)) -> None:
        """Import every module of `package` (found on `path`) so their @register calls run."""
        for info in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
            if info.name not in skip:
                importlib.import_module(f"{package}.{info.name}")

    def names(self) -> tuple[str, ...]:
        return tuple(self._classes)

    def get(self, name: str) -> T:
        """The registered class; callers validate the name against names() first."""
        assert name in self._classes, f"unvalidated {self.kind} {name!r}"
        return self._classes[name]
