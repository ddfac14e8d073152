"""The router registry: every module in this package registers its routers by name.

Adding a router is one file here (a `Router` subclass decorated with `@register`) plus
`conf/moe/<name>.yaml`; config validation, the cost report, the model's init, the naive
reference and the config schema all ask this registry.
"""

from __future__ import annotations

from xpar.moe.routers.base import LinearRouter, NaiveRoute, NoOptions, Router
from xpar.registry import Registry

ROUTERS: Registry[type[Router]] = Registry("router")
register = ROUTERS.register
router_names = ROUTERS.names
get_router = ROUTERS.get

ROUTERS.load(__name__, __path__)

__all__ = [
    "ROUTERS",
    "LinearRouter",
    "NaiveRoute",
    "NoOptions",
    "Router",
    "get_router",
    "register",
    "router_names",
]
