"""Checkpoints: directories under <out_dir>/checkpoints, per-rank files, an atomic `latest`.

    checkpoints/
      step_00000006/   rank<NNNNN>.pt (every rank: module incl. its experts, optimizer,
                       LR scheduler, engine counters, this rank's client state),
                       xpar_parallel.json (rank 0: the layout, library versions),
                       client_state.json (rank 0: step, data position, LR schedule
                       length, run record)
      latest           "step_00000006": replaced (write, fsync, rename) only after
                       every rank finished writing that step

A crash at any point leaves `latest` naming a complete checkpoint (or absent). Every
file goes through the one atomic writer, so no reader ever sees half a file.

Resume guard: a checkpoint resumes when its weights fit this model (parameter names and
shapes; refused otherwise, even with train.resume=force), it was trained with the same
tokenizer (its content), and this run's config is the one it recorded in everything but
MAY_DIFFER (the step count, where the run lives, how often it evaluates and saves, the
logger). Any other difference is listed (field, checkpoint value, now value) and refused
unless train.resume=force, which resumes with one warning line. A field the checkpoint
did not record (added to the config since) is not a difference. The deepspeed-specific
parts of a rank file (ZeRO optimizer state, the classes torch.load must allow) are the
engine adapter's.

`load_weights` is train.init_from: the module weights of a checkpoint, into a model that
has no engine yet (the engine's optimizer then starts from them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from xpar.config.store import XparConfigWarning
from xpar.errors import XparConfigError
from xpar.redact import redact, to_plain

if TYPE_CHECKING:
    from xpar.parallel.deepspeed import XparEngine

FORMAT = 1  # of the rank files; a reader of format N reads every format <= N
LATEST = "latest"
CLIENT_STATE = "client_state.json"
LAYOUT_FILE = "xpar_parallel.json"
_FIX = (
    "set train.out_dir to a new directory (or logger.run_name), or train.resume=never "
    "train.overwrite=true to start over"
)
_MAX_NAMED = 6  # parameters named in a refusal; a deep model would list hundreds


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def rank_file(directory: str | Path, rank: int) -> Path:
    return Path(directory) / f"rank{rank:05d}.pt"


# --------------------------------------------------------------------------- atomic files


def write_atomic(path: str | Path, content: str | Callable[[Path], None]) -> None:
    """Write (text, or `content(tmp_path)`), fsync, rename, fsync the directory.

    Readers see the old file or the new one, never a part; a failed write leaves no temp file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        if isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        else:
            content(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_client_state(directory: str | Path, state: dict) -> None:
    write_atomic(Path(directory) / CLIENT_STATE, json.dumps(state, indent=1, sort_keys=True))


def read_client_state(directory: str | Path) -> dict:
    with open(Path(directory) / CLIENT_STATE, encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------- latest, prune


def publish(root: str | Path, step: int) -> None:
    """Point `latest` at step (call on rank 0 after a barrier that follows every rank's save)."""
    write_atomic(Path(root) / LATEST, step_dir(root, step).name + "\n")


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    d = Path(root) / name
    if not name or not (d / CLIENT_STATE).is_file():
        raise FileNotFoundError(
            f"{pointer} names {name!r}, which is not a complete checkpoint; "
            "delete the pointer to start over or fix it to name a complete step_* directory"
        )
    return d


def prune(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` published checkpoints (never the one `latest` names)."""
    root = Path(root)
    current = latest(root)
    dirs = sorted(p for p in root.glob("step_*") if p.is_dir())
    if current is not None:
        # Unpublished directories newer than `latest` are partial writes of a crashed run.
        dirs = [p for p in dirs if p.name <= current.name]
    doomed = dirs[:-keep] if keep > 0 else dirs
    doomed = [p for p in doomed if p != current]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


# --------------------------------------------------------------------------- rank files


def _layout(engine: XparEngine) -> dict:
    return {"format": FORMAT, **engine.layout()}


def save(engine: XparEngine, directory: str | Path, client_state: dict | None = None) -> None:
    """Collective: every rank writes `rank<NNNNN>.pt` into `directory`; rank 0 adds a layout record.

    A rank file holds the engine's state (the full module state dict: dense params and
    this rank's experts; the optimizer's own per-rank state; the LR scheduler; the step
    counters) and this rank's `client_state` (tensors, numbers, strings, lists, dicts:
    loaded with weights_only=True). Works on a shared or a per-node file system (each
    rank reads back its own file).
    """
    directory = Path(directory)
    rank = engine.groups.rank
    directory.mkdir(parents=True, exist_ok=True)
    layout = _layout(engine)
    state = {"layout": layout, "rank": rank, **engine.state_dict()}
    state["client_state"] = client_state or {}
    write_atomic(rank_file(directory, rank), lambda p: torch.save(state, p))
    if rank == 0:
        meta = {**layout, **engine.versions()}
        write_atomic(directory / LAYOUT_FILE, json.dumps(meta, indent=1))
    dist.barrier()


def load(
    engine: XparEngine, directory: str | Path, run: Mapping | None = None, *, force: bool = False
) -> dict:
    """Collective: restore what `save` wrote into this engine; returns this rank's client_state.

    The engine must be built like the one that saved (world size, ep_size, ZeRO stage,
    precision; else XparConfigError) with a model the weights fit (see check_resumable).
    `run` is this run's `run_record(...)`, compared with the one in client_state.json: a
    difference is refused unless `force` (train.resume=force), which warns once on rank 0.
    """
    directory = Path(directory)
    state = _read_rank_file(engine, directory)
    saved_run = read_client_state(directory) if run is not None else None
    changed = check_resumable(
        directory, state["module"], engine.module.state_dict(), saved_run, run, force=force
    )
    if changed and engine.groups.rank == 0:
        warnings.warn(
            f"train.resume=force: resuming {directory} with a config that differs from the "
            f"checkpoint's ({'; '.join(changed)}); the weights fit this model, training "
            "continues from them under this config",
            XparConfigWarning,
            stacklevel=2,
        )
    try:
        engine.load_state_dict(state)
    except XparConfigError as e:
        raise XparConfigError(f"train.resume={str(directory)!r}: {e}") from e
    dist.barrier()
    return state["client_state"]


def load_weights(model: Any, directory: str | Path, groups: Any, run: Mapping | None) -> dict:
    """train.init_from: copy a checkpoint's module weights into `model`; returns its client state.

    Call before the engine is built, so the optimizer (and ZeRO's fp32 master copy) starts
    from these weights. A rank file holds the dense weights and one slice of the experts,
    so this rank reads the file of the rank that held its slice (`groups.ep_rank`): the
    world size may differ from the checkpoint's, its expert-parallel size may not. Refused
    when the weights do not fit or the tokenizer differs; other config changes are the point
    of a new run and are not compared.
    """
    from xpar.parallel.deepspeed import XparEngine  # the classes a rank file may hold

    directory, where = Path(directory), f"train.init_from={str(directory)!r}"
    path = rank_file(directory, groups.ep_rank)
    if not path.is_file():
        raise XparConfigError(
            f"{where}: no checkpoint file {path.name} (the experts of EP rank {groups.ep_rank}); "
            "name a complete checkpoint written with this run's parallel.ep_size"
        )
    with torch.serialization.safe_globals(XparEngine.safe_globals()):
        state = torch.load(path, map_location="cpu", weights_only=True)
    saved_ep = state["layout"]["ep_size"]
    if saved_ep != groups.ep_size:
        raise XparConfigError(
            f"{where} was saved with ep_size={saved_ep} but this run has ep_size="
            f"{groups.ep_size}: every rank file holds its own slice of the experts; set "
            f"parallel.ep_size={saved_ep} (and a world size it divides)"
        )
    saved_run = read_client_state(directory)
    check_resumable(
        directory, state["module"], model.state_dict(), saved_run, run, force=True, what=where
    )
    model.load_state_dict(state["module"])
    return saved_run


def _read_rank_file(engine: XparEngine, directory: Path) -> dict:
    rank = engine.groups.rank
    path = rank_file(directory, rank)
    if not path.is_file():
        raise XparConfigError(
            f"train.resume={str(directory)!r}: no checkpoint file {path.name} for rank "
            f"{rank}; resume with the world size the checkpoint was saved with"
        )
    with torch.serialization.safe_globals(engine.safe_globals()):
        state = torch.load(path, map_location="cpu", weights_only=True)
    want, have = _layout(engine), state["layout"]
    if want != have or state["rank"] != rank:
        raise XparConfigError(
            f"train.resume={str(directory)!r} was saved with {have} (rank {state['rank']}) but "
            f"this run is {want} (rank {rank}); resume with the same world size, "
            "parallel.ep_size, parallel.zero_stage and parallel.precision"
        )
    return state


# --------------------------------------------------------------------------- resume guard

# Config groups recorded under "training" (model and moe are under "model", with the
# resolved vocab size); logger.* is not recorded: it never changes what is trained.
TRAINING_GROUPS = ("data", "optim", "parallel", "train")

# What a resume may change without train.resume=force, and why it cannot matter.
MAY_DIFFER = frozenset(
    {
        "train.steps",  # where to stop (the LR schedule keeps the checkpoint's length)
        "train.resume",  # how to start, not what to train
        "train.overwrite",
        "train.init_from",  # a resumed run's weights come from its checkpoint
        "train.noop_ok",
        "train.out_dir",  # a moved or copied run
        "train.eval_every",  # evaluation and saving only measure and keep the run
        "train.eval_batches",
        "train.ckpt_every",
        "train.keep_checkpoints",
        "train.max_time_s",  # a budget for this invocation
        "train.print_config",  # the console
        "train.verbose",
        "train.max_bad_steps",  # when a failing run stops, not what a healthy one trains
        "train.max_loss",
        "parallel.timeout_s",  # how long a collective may wait
        "data.cache_dir",  # where the token cache lives, not what it holds
        "data.tokenizer",  # its path; its content is compared (the fingerprint)
    }
)


def run_record(cfg: Any, model_cfg: Any, tokenizer: Any) -> dict:
    """What client_state.json records about the run: the configs that built the weights
    (model with the resolved vocab size, moe), the rest that shapes training (data, optim,
    parallel, train: all of it; MAY_DIFFER is applied when comparing), the tokenizer.

    `cfg` is the XparConfig, `model_cfg` the model config the weights were built with,
    `tokenizer` the built one (its vocab_size and content fingerprint). Plain JSON values,
    secrets redacted (xpar.redact).
    """
    plain = redact(to_plain(cfg))
    rec = {
        "model": {"model": dataclasses.asdict(model_cfg), "moe": dataclasses.asdict(cfg.moe)},
        "training": {group: plain[group] for group in TRAINING_GROUPS},
        "tokenizer": {
            "spec": cfg.data.tokenizer,
            "fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size,
        },
    }
    return json.loads(json.dumps(rec))  # the values as a reader of the file will see them


def check_resumable(
    where: str | Path,
    saved_state: Mapping[str, Any],
    model_state: Mapping[str, Any],
    saved_run: Mapping | None,
    run: Mapping | None,
    *,
    force: bool = False,
    what: str = "train.resume",
) -> list[str]:
    """Refuse a checkpoint that cannot be loaded into this model, or (unless `force`) one
    whose recorded config differs; return the differences (accepted by `force`).

    Loadable: the same parameter names and shapes (saved module state dict vs this model's)
    and the same tokenizer (content and vocab size; a checkpoint from before the tokenizer
    was recorded is judged by its embedding shape alone). Refused even with `force`. A
    config field the checkpoint did not record (added since) is not a difference.
    """
    saved_run, run = saved_run or {}, run or {}
    changed = changed_fields(saved_run, run)
    problems = _shape_problems(saved_state, model_state) + _tokenizer_problems(saved_run, run)
    if problems:
        cause = changed + _tokenizer_moved(saved_run, run)
        because = f" ({'; '.join(cause)})" if cause else ""
        raise XparConfigError(
            f"{what}: the checkpoint {where} was written by a different model{because} "
            f"and cannot be loaded into this one: {'; '.join(problems)}; {_FIX}"
        )
    if changed and not force:
        raise XparConfigError(
            f"{what}: the checkpoint {where} was written with a different config: "
            f"{'; '.join(changed)}; to continue it under this config set train.resume=force, "
            f"or {_FIX}"
        )
    return changed


def changed_fields(saved_run: Mapping, run: Mapping) -> list[str]:
    """'<group>.<field>: checkpoint <old>, now <new>' for each recorded field that differs,
    leaving out MAY_DIFFER and fields the checkpoint did not record."""
    out = []
    for section in ("model", "training"):
        saved_cfg, now_cfg = saved_run.get(section, {}), run.get(section, {})
        for group in sorted(now_cfg):
            saved_group = saved_cfg.get(group, {})
            out += [
                f"{group}.{k}: checkpoint {saved_group[k]!r}, now {v!r}"
                for k, v in now_cfg[group].items()
                if k in saved_group and saved_group[k] != v and f"{group}.{k}" not in MAY_DIFFER
            ]
    return out


def _tokenizer_moved(saved_run: Mapping, run: Mapping) -> list[str]:
    saved, now = saved_run.get("tokenizer", {}), run.get("tokenizer", {})
    if "spec" in saved and "spec" in now and saved["spec"] != now["spec"]:
        return [f"data.tokenizer: checkpoint {saved['spec']!r}, now {now['spec']!r}"]
    return []


def _shape_problems(saved_state: Mapping[str, Any], model_state: Mapping[str, Any]) -> list[str]:
    bad = []
    for name in sorted(set(saved_state) | set(model_state)):
        saved, now = _shape(saved_state, name), _shape(model_state, name)
        if saved != now:
            bad.append(f"{name} saved {saved}, now {now}")
    if len(bad) > _MAX_NAMED:
        bad = bad[:_MAX_NAMED] + [f"and {len(bad) - _MAX_NAMED} more parameters"]
    return bad


def _shape(state: Mapping[str, Any], name: str) -> str:
    if name not in state:
        return "absent"
    t = state[name]
    return str(list(t.shape)) if hasattr(t, "shape") else type(t).__name__


def _tokenizer_problems(saved_run: Mapping, run: Mapping) -> list[str]:
    saved, now = saved_run.get("tokenizer", {}), run.get("tokenizer", {})
    out = []
    for key, what in (("fingerprint", "tokenizer content"), ("vocab_size", "vocabulary size")):
        if key in saved and key in now and saved[key] != now[key]:
            out.append(f"{what} saved {saved[key]!r}, now {now[key]!r} (token ids would change)")
    return out
