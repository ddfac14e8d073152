"""Which config keys hold secrets: one rule for the printed, logged and saved config."""

from __future__ import annotations

import re
from typing import Any

REDACTED = "<redacted>"
# Key names are split into words (snake, kebab, dots, camelCase) and matched word by word,
# so `hf_token`, `apiKey`, `WANDB_API_KEY` are secrets but `tokenizer` and `max_tokens` are not.
SECRET_KEY_WORDS = frozenset(
    ("key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials", "auth")
)


def key_words(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", key)
    return [w.lower() for w in re.split(r"[^A-Za-z0-9]+", spaced) if w]


def is_secret_key(key: Any) -> bool:
    return isinstance(key, str) and any(w in SECRET_KEY_WORDS for w in key_words(key))
