"""The resume guard: does a checkpoint fit this run, and what of its config changed?

A checkpoint resumes when its weights fit this model (parameter names and
shapes; refused otherwise, even with train.resume=force), it was trained with the same
tokenizer (its content), and this run's config is the one it recorded in everything but
MAY_DIFFER (the step count, where the run lives, how often it evaluates and saves, the
logger, the parallel layout: a checkpoint reshards, xpar.train.reshard). How the global
batch is split (train.micro_batch_size, train.grad_accum) may change too as long as the
global batch (micro_batch_size x grad_accum x world size) stays the checkpoint's. Any other
difference is listed (field, checkpoint value, now value) and refused
unless train.resume=force, which resumes with one warning line. A field the checkpoint
did not record (added to the config since) is not a difference.

`run_record` is what a checkpoint's client_state.json records about its run; `check_resumable`
compares it and the weights' names and shapes with this run's.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from xpar.errors import XparConfigError
from xpar.redact import redact, to_plain

_FIX = (
    "set train.out_dir to a new directory (or logger.run_name), or train.resume=never "
    "train.overwrite=true to start over"
)
_MAX_NAMED = 6  # parameters named in a refusal; a deep model would list hundreds

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
        "train.compile",
        "moe.comm_chunks",  # how the same numbers are computed, not what is trained
        "moe.exchange",
        "moe.expert_gemm",
        "moe.recompute",
        "train.max_bad_steps",  # when a failing run stops, not what a healthy one trains
        "train.max_loss",
        "parallel.timeout_s",  # how long a collective may wait
        "parallel.ep_size",  # the layout: the checkpoint reshards (xpar.train.reshard)
        "parallel.zero_stage",
        "data.cache_dir",  # where the token cache lives, not what it holds
        "data.tokenizer",  # its path; its content is compared (the fingerprint)
        "moe.upcycle",  # how a new run started, like train.init_from
        "moe.upcycle_noise",
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


# How the global batch is split over micro batches, accumulation and ranks: free to change
# while the global batch stays (a resume at another world size keeps it this way).
BATCH_SPLIT = ("micro_batch_size", "grad_accum")


def check_resumable(
    where: str | Path,
    saved_state: Mapping[str, Any],
    model_state: Mapping[str, Any],
    saved_run: Mapping | None,
    run: Mapping | None,
    *,
    force: bool = False,
    what: str = "train.resume",
    world_size: int | None = None,
) -> list[str]:
    """Refuse a checkpoint that cannot be loaded into this model, or (unless `force`) one
    whose recorded config differs; return the differences (accepted by `force`).

    Loadable: the same parameter names and shapes (saved module state dict vs this model's)
    and the same tokenizer (content and vocab size; a checkpoint from before the tokenizer
    was recorded is judged by its embedding shape alone). Refused even with `force`. A
    config field the checkpoint did not record (added since) is not a difference.
    `world_size` is this run's: with the checkpoint's (client_state.json's world_size) it
    decides whether a changed micro_batch_size or grad_accum keeps the global batch.
    """
    saved_run, run = saved_run or {}, run or {}
    changed = changed_fields(saved_run, run, world_size)
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


def changed_fields(saved_run: Mapping, run: Mapping, world_size: int | None = None) -> list[str]:
    """'<group>.<field>: checkpoint <old>, now <new>' for each recorded field that differs,
    leaving out MAY_DIFFER, fields the checkpoint did not record, and a new split of the
    same global batch (`batch_changes`)."""
    split = {f"train.{k}" for k in BATCH_SPLIT}
    out = []
    for section in ("model", "training"):
        saved_cfg, now_cfg = saved_run.get(section, {}), run.get(section, {})
        for group in sorted(now_cfg):
            saved_group = saved_cfg.get(group, {})
            out += [
                f"{group}.{k}: checkpoint {saved_group[k]!r}, now {v!r}"
                for k, v in now_cfg[group].items()
                if k in saved_group
                and saved_group[k] != v
                and f"{group}.{k}" not in MAY_DIFFER | split
            ]
    return out + batch_changes(saved_run, run, world_size)


def batch_changes(saved_run: Mapping, run: Mapping, world_size: int | None) -> list[str]:
    """The changed train.micro_batch_size / train.grad_accum, unless the global batch
    (their product times the world size) is the checkpoint's; then none. A global batch
    that changes with the world size alone is no config change (the resume line says it)."""
    saved = saved_run.get("training", {}).get("train", {})
    now = run.get("training", {}).get("train", {})
    out = [
        f"train.{k}: checkpoint {saved[k]!r}, now {now[k]!r}"
        for k in BATCH_SPLIT
        if k in saved and k in now and saved[k] != now[k]
    ]
    saved_world = saved_run.get("world_size")
    if not out or world_size is None or saved_world is None:
        return out
    if not all(k in saved and k in now for k in BATCH_SPLIT):
        return out

    def batch(t: Mapping, w: int) -> tuple[int, str]:
        n = int(t["micro_batch_size"]) * int(t["grad_accum"]) * w
        return n, f"{n} ({t['micro_batch_size']} x {t['grad_accum']} x {w} ranks)"

    (b0, say0), (b1, say1) = batch(saved, int(saved_world)), batch(now, world_size)
    if b0 == b1:
        return []
    what = "train.global_batch (micro_batch_size x grad_accum x ranks)"
    return out + [f"{what}: checkpoint {say0}, now {say1}"]


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
