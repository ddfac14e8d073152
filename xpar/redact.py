"""The one secret rule, for keys and values: the printed, logged (W&B) and saved config use it.

`redact(to_plain(config))` is the config as it may leave the process; `redact_hydra_output`
applies the rule to the files Hydra writes from the raw overrides (.hydra/).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "REDACTED",
    "SECRET_KEY_WORDS",
    "SECRET_VALUE_PATTERNS",
    "is_secret_key",
    "key_words",
    "looks_like_secret",
    "redact",
    "redact_hydra_output",
    "redact_yaml_files",
    "to_plain",
]

REDACTED = "<redacted>"
# Key names are split into words (snake, kebab, dots, camelCase) and matched word by word,
# so `hf_token`, `apiKey`, `WANDB_API_KEY` are secrets but `tokenizer` and `max_tokens` are not.
SECRET_KEY_WORDS = frozenset(
    ("key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials", "auth")
)

# A string is a secret when any of these is found anywhere in it. A 40-hex git sha is caught
# too: a small price for never leaking a key.
SECRET_VALUE_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"[0-9a-fA-F]{40}"),  # W&B API keys
    re.compile(r"(?:sk|hf|ghp|gho|github_pat|wandb|xox[bp])[-_][A-Za-z0-9_\-]{16,}"),  # tokens
    re.compile(r"(?=[A-Za-z0-9]*\d)(?=[A-Za-z0-9]*[A-Za-z])[A-Za-z0-9]{32,}"),  # random-looking
    # The monitor's former rule (a W&B key with an optional host label, "local-<40 hex>"; a
    # Hugging Face token). The first two patterns find every match of these as well; they stay
    # so that narrowing those two cannot quietly drop what was redacted before.
    re.compile(r"(?<![0-9A-Za-z])(?:[A-Za-z0-9_]+-)?[0-9a-fA-F]{40}(?![0-9A-Za-z])"),
    re.compile(r"(?<![0-9A-Za-z])hf_[A-Za-z0-9]{30,}"),
)

# A secret key given a value inside a string is a secret too: "api_key=abc", "token: abc",
# "--api-key abc" (an override, a command line, a URL query). The key is found whole (never
# part of a longer word) and judged by is_secret_key, so "tokenizer=byte" stays.
_ASSIGNMENTS: tuple[re.Pattern[str], ...] = (
    re.compile(r"(?<![\w.\-])([A-Za-z_][\w.\-]*)\s*[=:]\s*(?=\S)"),
    re.compile(r"(?<![\w\-])--([A-Za-z_][\w.\-]*)(?:\s*=\s*|\s+)(?=[^\s\-])"),
)


def key_words(key: str) -> list[str]:
    """A key's words, lowercased: hfToken -> hf, token; WANDB_API_KEY -> wandb, api, key."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", key)
    return [w.lower() for w in re.split(r"[^A-Za-z0-9]+", spaced) if w]


def is_secret_key(key: Any) -> bool:
    """Whether a config key names a secret (a word of it is key, token, secret, password, ...)."""
    return isinstance(key, str) and any(w in SECRET_KEY_WORDS for w in key_words(key))


def looks_like_secret(value: object) -> bool:
    """Whether a string looks like an API key or access token, or holds one (also as the
    value of a secret key: "api_key=...")."""
    if not isinstance(value, str):
        return False
    if any(p.search(value) for p in SECRET_VALUE_PATTERNS):
        return True
    return any(is_secret_key(m.group(1)) for p in _ASSIGNMENTS for m in p.finditer(value))


def redact(obj: Any) -> Any:
    """Copy of a plain nested dict/list with secrets replaced by REDACTED.

    A value goes when its key names a secret (and it is not empty: nothing to hide), or when
    it is a string that looks like a secret: the whole string goes, not only the part that
    matched. Keys become strings and tuples lists, as in JSON."""
    if isinstance(obj, Mapping):
        return {str(k): _redact_entry(str(k), v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    return REDACTED if looks_like_secret(obj) else obj


def _redact_entry(key: str, value: Any) -> Any:
    if is_secret_key(key) and not _is_empty(value):
        return REDACTED
    return redact(value)


def _is_empty(x: Any) -> bool:
    return x is None or x == "" or x == {} or x == []


def redact_yaml_files(directory: str | os.PathLike | None) -> list[str]:
    """Rewrite each *.yaml in `directory` with its secrets redacted; the names rewritten.

    For Hydra's .hydra/ (config, hydra and overrides .yaml), written from the raw overrides
    before xpar sees the config. Interpolations stay unresolved; a file without secrets is
    not touched. None (no .hydra/ on this rank) or a missing directory: nothing to do."""
    if directory is None or not os.path.isdir(directory):
        return []
    from omegaconf import OmegaConf

    done = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not name.endswith(".yaml") or not os.path.isfile(path):
            continue
        plain = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        clean = redact(plain)
        if clean != plain:
            with open(path, "w") as f:
                f.write(OmegaConf.to_yaml(OmegaConf.create(clean)))
            done.append(name)
    return done


def redact_hydra_output() -> list[str]:
    """Inside @hydra.main: redact the .hydra/ files this job wrote (ranks > 0 write none)."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    if not hc.output_subdir:
        return []
    return redact_yaml_files(os.path.join(hc.runtime.output_dir, hc.output_subdir))


def to_plain(config: Any) -> Any:
    """Dataclass / OmegaConf node / mapping -> plain dicts, lists and scalars (None stays None)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    elif type(config).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(config, resolve=True)
    if isinstance(config, Mapping):
        return {str(k): to_plain(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_plain(v) for v in config]
    if isinstance(config, (str, int, float, bool)) or config is None:
        return config
    if isinstance(config, os.PathLike):
        return os.fspath(config)
    return str(config)
