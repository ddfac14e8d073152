"""Hydra plumbing: schemas in the ConfigStore, compose to a typed XparConfig, rank-aware output.

Importing this module registers, once per process:
  - the root schema `xpar_schema` (XparConfig) and one `schema` option per group
    (model/schema, moe/schema, ...), which conf/*.yaml list first in their defaults so
    every value is type-checked and unknown keys are rejected (struct mode);
  - OmegaConf resolvers used by conf/config.yaml and conf/hydra/job_logging/xpar.yaml:
      ${xpar.hydra_subdir:}     ".hydra" on rank 0, null elsewhere: only rank 0 writes .hydra/
      ${xpar.log_file:NAME}     "NAME.log" on rank 0, "NAME.rank<r>.log" elsewhere
      ${xpar.console_level:}    INFO on rank 0, WARNING elsewhere (other ranks stay quiet)
    The rank comes from RANK (torchrun), else SLURM_PROCID (srun), else 0.

The entry point therefore only has to import xpar.config before @hydra.main runs and
point config_path at CONFIG_DIR:

    from xpar.config import CONFIG_DIR, load_and_validate

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
    def main(cfg):
        xcfg = load_and_validate(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.initialize import get_gh_backup, restore_gh_from_backup
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

import xpar
from xpar.config.schema import (
    DataConfig,
    LoggerConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    ParallelConfig,
    TaskConfig,
    XparConfig,
)
from xpar.errors import XparConfigError
from xpar.redact import REDACTED, looks_like_secret, redact, to_plain

GROUP_SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "moe": MoEConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "parallel": ParallelConfig,
    "logger": LoggerConfig,
    "task": TaskConfig,
}
ROOT_SCHEMA_NAME = "xpar_schema"
GROUP_SCHEMA_NAME = "schema"


class XparConfigWarning(UserWarning):
    """A legal config that is probably not what the user meant."""


def find_config_dir() -> Path:
    """The conf/ directory, wherever xpar is imported from.

    Installed (wheel or editable): the package data xpar/conf (pyproject maps xpar.conf -> conf).
    Source tree without install: conf/ next to the xpar/ package directory.
    """
    pkg = Path(xpar.__file__).resolve().parent
    candidates = [pkg / "conf", pkg.parent / "conf"]
    try:
        import importlib.util

        spec = importlib.util.find_spec("xpar.conf")
    except ImportError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates.extend(Path(p) for p in spec.submodule_search_locations)
    for c in candidates:
        if (c / "config.yaml").is_file() and (c / "experiment").is_dir():
            return c
    raise FileNotFoundError(
        f"xpar's conf/ directory was not found (looked in {', '.join(map(str, candidates))}); "
        "reinstall xpar (pip install .) or run from the source tree"
    )


CONFIG_DIR: Path = find_config_dir()


def current_rank() -> int:
    """This process's global rank from the launcher's environment (0 when not launched)."""
    for var in ("RANK", "SLURM_PROCID"):
        v = os.environ.get(var, "")
        if v.strip().isdigit():
            return int(v)
    return 0


def _hydra_subdir() -> str | None:
    return ".hydra" if current_rank() == 0 else None


def _log_file(name: str) -> str:
    r = current_rank()
    return f"{name}.log" if r == 0 else f"{name}.rank{r}.log"


def _console_level() -> str:
    return "INFO" if current_rank() == 0 else "WARNING"


def register_configs() -> None:
    """Register schemas and resolvers (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name=ROOT_SCHEMA_NAME, node=XparConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name=GROUP_SCHEMA_NAME, node=schema)
    OmegaConf.register_new_resolver("xpar.hydra_subdir", _hydra_subdir, replace=True)
    OmegaConf.register_new_resolver("xpar.log_file", _log_file, replace=True)
    OmegaConf.register_new_resolver("xpar.console_level", _console_level, replace=True)
    # ${xpar.required:KEY,EXAMPLE}: a mandatory value. Hydra merges "???" away when a schema
    # default exists, so a resolver that fails when read (unless overridden) stands in for it.
    OmegaConf.register_new_resolver("xpar.required", _required, replace=True)


def compose_config(
    overrides: Sequence[str] | None = None,
    config_dir: str | os.PathLike | None = None,
    *,
    config_name: str = "config",
    world_size: int | None = None,
    cuda_available: bool | None = None,
) -> XparConfig:
    """Compose conf/ (or config_dir) with Hydra overrides and return the validated XparConfig.

    world_size=None takes WORLD_SIZE from the environment (1 when unset). Runs without a
    process group; safe to call inside a running @hydra.main app (Hydra's global state is
    saved and restored). Raises XparConfigError for every user mistake.
    """
    overrides = list(overrides or [])
    cfg = compose_dictconfig(overrides, config_dir, config_name=config_name)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return load_and_validate(cfg, world_size, cuda_available=cuda_available)


def compose_dictconfig(
    overrides: Sequence[str] | None = None,
    config_dir: str | os.PathLike | None = None,
    *,
    config_name: str = "config",
) -> DictConfig:
    """The composed, unvalidated DictConfig (no hydra node): for inspection and tests."""
    overrides = list(overrides or [])
    cdir = Path(config_dir).resolve() if config_dir is not None else CONFIG_DIR
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(cdir), version_base="1.3", job_name="xpar"):
            return compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise XparConfigError(_explain(e, overrides)) from e
    finally:
        restore_gh_from_backup(backup)


def load_and_validate(
    cfg: DictConfig | Mapping,
    world_size: int,
    *,
    rank: int | None = None,
    cuda_available: bool | None = None,
) -> XparConfig:
    """Typed, validated XparConfig from a composed DictConfig (e.g. the one @hydra.main passes).

    Warnings are issued (XparConfigWarning) on rank 0 only; rank=None reads RANK.
    """
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
    try:
        merged = OmegaConf.merge(OmegaConf.structured(XparConfig), cfg)
        _reject_unknown_keys(merged, XparConfig, "")
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise XparConfigError(_explain(e, [])) from e
    assert isinstance(obj, XparConfig)
    notes = obj.validate(world_size, cuda_available=cuda_available)
    if (current_rank() if rank is None else rank) == 0:
        for note in notes:
            warnings.warn(note, XparConfigWarning, stacklevel=2)
    return obj


def _reject_unknown_keys(node: DictConfig, typ: type, path: str) -> None:
    # "+model.typo=1" force-adds a key past struct mode and OmegaConf.to_object would
    # quietly drop it: refuse it here instead.
    fields = {f.name for f in dataclasses.fields(typ)}
    hints = typing.get_type_hints(typ)
    for key in node.keys():
        full = f"{path}{key}"
        if key not in fields:
            raise XparConfigError(unknown_key_message(full))
        child = node._get_node(key)
        sub = hints[key]
        if dataclasses.is_dataclass(sub) and isinstance(child, DictConfig) and not child._is_none():
            _reject_unknown_keys(child, sub, f"{full}.")


def _required(key: str, example: str = "") -> Any:
    raise XparConfigError(
        f"{key} is required here and has no value: set it on the command line"
        + (f", e.g. {example}" if example else "")
    )


def to_plain_dict(cfg: XparConfig | DictConfig) -> dict[str, Any]:
    """A JSON-ready nested dict of the config for W&B and checkpoints, with secrets redacted.

    Any key named like a secret (…key, token, secret, password, auth…) and any string that
    looks like an API key is replaced by "<redacted>" (the one rule: xpar.redact).
    """
    return redact(to_plain(cfg))


def _explain(e: BaseException, overrides: list[str]) -> str:
    """Hydra/OmegaConf's message as one line that says what to do about it."""
    ours = _xpar_error_in(e)
    if ours is not None:
        return str(ours)  # raised by one of our resolvers: already says what to do
    if isinstance(e, MissingConfigException) and e.missing_cfg_file:
        return missing_option_message(e.missing_cfg_file, e.options or [])
    if isinstance(e, OverrideParseException):
        return _unparsable_message(e)
    cause = e
    while cause.__cause__ is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    msg = str(e).strip()
    if cause is not e and str(cause).strip() not in msg:
        msg += f" ({str(cause).strip()})"
    shown = [REDACTED if looks_like_secret(o) else o for o in overrides]  # errors are printed
    where = f" (overrides: {' '.join(shown)})" if overrides else ""
    full_key = getattr(cause, "full_key", None) or ""
    if isinstance(cause, MissingMandatoryValue) and full_key:
        return (
            f"{full_key}=??? has no value{where}: it is mandatory for this config; "
            f"set it on the command line, e.g. {full_key}=..."
        )
    if full_key and ("not in" in msg or isinstance(cause, (ConfigKeyError, ConfigAttributeError))):
        # Hydra would suggest "+key=value" to append, but schema'd nodes refuse new keys too.
        return unknown_key_message(full_key)
    if isinstance(cause, ValidationError) and full_key:
        first = str(cause).strip().splitlines()[0]
        return f"{full_key} has a value of the wrong type{where}: {first}; give a value of its type"
    return f"invalid configuration{where}: {_one_line(msg)}"


def _xpar_error_in(e: BaseException) -> XparConfigError | None:
    inner: BaseException | None = e
    while inner is not None:
        if isinstance(inner, XparConfigError):
            return inner
        inner = inner.__cause__ or inner.__context__
    return None


def _one_line(text: str) -> str:
    # A config error is one line on the console: Hydra's tabs and newlines are layout only.
    return " ".join(text.split())


def _did_you_mean(word: str, candidates: Sequence[str], show: str = "{}") -> str:
    """ "; did you mean X or Y?" for the candidates closest by edit distance ("" if none is)."""
    close = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(show.format(c) for c in close)}?" if close else ""


def unknown_key_message(full_key: str) -> str:
    """`train.stpes is not a key of train; did you mean train.steps?` (the keys when none is close)."""
    parent, _, leaf = full_key.rpartition(".")
    if not parent:
        nodes = _valid_keys("")
        names = sorted(set(nodes) | set(_groups()))
        hint = _did_you_mean(leaf, names)
        return f"{leaf} is not a top-level key or config group{hint or '; they are ' + ', '.join(names)}"
    keys = _valid_keys(parent)
    hint = _did_you_mean(leaf, keys, show=f"{parent}.{{}}")
    if hint:
        return f"{full_key} is not a key of {parent}{hint}"
    if keys:
        return f"{full_key} is not a key of {parent}; the keys of {parent} are {', '.join(keys)}"
    return (
        f"{full_key} is not a key of {parent}; check the spelling "
        "(python -m xpar.train --cfg job prints the whole config)"
    )


def missing_option_message(missing: str, options: Sequence[str]) -> str:
    """`moe=topkk is not an option of moe ...; did you mean moe=topk? options of moe: ...`."""
    group, _, name = missing.rpartition("/")
    if not group:
        return f"{missing} is not a config in conf/; check the spelling"
    choices = [o for o in options if o != GROUP_SCHEMA_NAME]  # the schema is not a choice
    hint = _did_you_mean(name, choices, show=f"{group}={{}}")
    head = f"{group}={name} is not an option of {group} (there is no {missing}.yaml)"
    if hint:
        return f"{head}{hint} (options: {', '.join(choices)})"
    return f"{head}; the options of {group} are {', '.join(choices) or '(none)'}"


def _unparsable_message(e: OverrideParseException) -> str:
    lines = [ln for ln in str(e.message).splitlines() if ln.strip()]
    why = [ln for ln in lines if not ln.startswith(("Error parsing override", "See "))]
    return (
        f"the override {REDACTED if looks_like_secret(e.override) else repr(e.override)} "
        f"cannot be parsed ({_one_line(' '.join(why)) or 'bad syntax'}); "
        "write key=value, group=option, +key=value or ~key (Hydra's override grammar)"
    )


def _groups() -> list[str]:
    """Config groups under conf/ (experiment, model, moe, ...): also legal top-level names."""
    return sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and not p.name.startswith("_"))


def _valid_keys(path: str) -> list[str]:
    typ: Any = XparConfig
    for part in [p for p in path.split(".") if p]:
        if not dataclasses.is_dataclass(typ):
            return []
        hints = typing.get_type_hints(typ)
        if part not in hints:
            return []
        typ = hints[part]
    if not dataclasses.is_dataclass(typ):
        return []
    return [f.name for f in dataclasses.fields(typ)]


register_configs()
