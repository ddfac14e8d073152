"""The attention registry: every module in this package registers its variants by name.

Adding an attention variant is one file here (an `Attention` subclass decorated with
`@register`) plus its test; `model.attention=<name>` selects it and
`model.attention_options` carries its own options.
"""

from __future__ import annotations

from xpar.models.attention.base import Attention, NoOptions
from xpar.registry import Registry

ATTENTIONS: Registry[type[Attention]] = Registry("attention")
register = ATTENTIONS.register
attention_names = ATTENTIONS.names
get_attention = ATTENTIONS.get

ATTENTIONS.load(__name__, __path__)

__all__ = ["ATTENTIONS", "Attention", "NoOptions", "attention_names", "get_attention", "register"]
