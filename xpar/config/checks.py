"""The config checks every config dataclass uses: one wording for one kind of mistake.

Each raises XparConfigError "<prefix>.<field>=<value> is invalid: <fix>". Pure Python,
no torch: config nodes import this before anything heavy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

from xpar.errors import XparConfigError


def bad(prefix: str, name: str, value: object, fix: str) -> XparConfigError:
    return XparConfigError(f"{prefix}.{name}={value!r} is invalid: {fix}")


def is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_finite(v: object) -> bool:
    return is_number(v) and math.isfinite(v)


def need_int(prefix: str, obj: object, name: str, lo: int, fix: str | None = None) -> None:
    v = getattr(obj, name)
    if not is_int(v) or v < lo:
        raise bad(prefix, name, v, fix or f"use an integer >= {lo}")


def need_ints(prefix: str, obj: object, names: Iterable[str], lo: int) -> None:
    for name in names:
        need_int(prefix, obj, name, lo)


def need_number(prefix: str, obj: object, name: str, lo: float, fix: str) -> None:
    """A finite number >= lo."""
    v = getattr(obj, name)
    if not is_finite(v) or v < lo:
        raise bad(prefix, name, v, fix)


def need_positive(
    prefix: str, obj: object, name: str, fix: str = "use a finite number > 0"
) -> None:
    v = getattr(obj, name)
    if not is_finite(v) or not v > 0:
        raise bad(prefix, name, v, fix)


def need_choice(prefix: str, obj: object, name: str, choices: Iterable) -> None:
    v = getattr(obj, name)
    choices = tuple(choices)
    if v not in choices:
        raise bad(prefix, name, v, f"choose one of {', '.join(map(str, choices))}")


def need_bool(prefix: str, obj: object, name: str) -> None:
    v = getattr(obj, name)
    if not isinstance(v, bool):
        raise bad(prefix, name, v, "use true or false")


def need_str(prefix: str, obj: object, name: str, fix: str) -> None:
    """A non-empty string."""
    v = getattr(obj, name)
    if not isinstance(v, str) or not v:
        raise bad(prefix, name, v, fix)


def build_options(cls: type, given: Any, where: str) -> Any:
    """A variant's Options dataclass from a mapping; unknown keys name the valid ones.

    Options classes check their values in `validate(prefix)`, called here with `where`.
    """
    if not hasattr(given, "keys"):
        raise XparConfigError(f"{where}={given!r} is invalid: use a mapping of option names")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in given.keys() if k not in known)
    if unknown:
        valid = ", ".join(sorted(known)) or "none"
        raise XparConfigError(
            f"{where}.{unknown[0]} is not an option of this variant: its options are {valid}; "
            "check the spelling"
        )
    opts = cls(**{str(k): v for k, v in given.items()})
    if hasattr(opts, "validate"):
        opts.validate(where)
    return opts
