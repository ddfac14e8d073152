"""Where a run starts, decided once before any process group (every rank reads the same files
and reaches the same plan): continue a checkpoint, start from a checkpoint's weights, or start
from nothing; and whether the out_dir's old run must first make way.

    train.resume=auto|force  the newest complete checkpoint in <out_dir>/checkpoints, if any
    train.resume=<dir>       that checkpoint (a step_* directory, a checkpoints/ directory or
                             a run's out_dir)
    train.resume=never       none
    train.init_from=<dir>    a new run (step 0, new optimizer, schedule, data order and W&B
                             run) from that checkpoint's weights, when there is none to resume
                             (hf:<dir>: a Hugging Face model's; xpar.train.init_source)

Rules:
- A damaged checkpoint (a file missing, truncated, changed since it was written, or
  unreadable: xpar.train.checkpoint checks each file's checksum) is passed over by
  train.resume=auto|force for the newest older complete one, with one line each, here for
  client_state.json (and a `latest` naming no complete checkpoint) and after the process
  group for the rank files (`loadable`: every rank checks its own file, the ranks agree in
  one all-reduce). None left: a clear error naming each. train.resume=<dir> names one
  checkpoint and never falls back.
- A checkpoint already at or past train.steps leaves nothing to do: one line, exit
  EXIT_NOTHING_TO_DO (4), or 0 with train.noop_ok=true. Nothing is built or written.
- A resumed config that differs from the checkpoint's is refused unless train.resume=force
  (xpar.train.checkpoint.check_resumable, after the model is built); the LR schedule keeps
  the checkpoint's length (xpar.train.schedule.resume_note).
- init_from with a checkpoint to resume in out_dir: the resume wins, with a warning line, so
  a preempted or requeued fine-tune continues itself. init_from with resume=<dir> is refused.
- A run that starts at step 0 in an out_dir holding a run (checkpoints, or metrics.jsonl) is
  refused unless train.overwrite=true; then rank 0 moves the old run's files aside (one rename
  each into a hidden folder) and deletes them before any rank writes (`clear_old_run`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import shutil
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from xpar.config.schema import XparConfig
from xpar.config.store import XparConfigWarning, current_rank
from xpar.errors import XparConfigError
from xpar.train import checkpoint as ckpt
from xpar.train import init_source
from xpar.train.schedule import resume_note
from xpar.train.sinks.jsonl import METRICS_FILE
from xpar.train.sinks.load_map import LOAD_FILE, LOAD_PNG

# A finished run found again: distinct from 1 (a crash), 2 (a config error), 75 (preempted).
EXIT_NOTHING_TO_DO = 4

# An out_dir's files that belong to one run (the Hydra files .hydra/ and *.log are this
# launch's own, written before the trainer starts). A new per-run file belongs here.
RUN_FILES = (
    "checkpoints",
    METRICS_FILE,
    LOAD_FILE,
    LOAD_PNG,
    "wandb",
    "config.yaml",
    "startup.json",
)
_ASIDE = ".xpar-overwritten-"  # prefix of the folder an overwrite moves the old run into


@dataclass(frozen=True)
class Start:
    """The plan: at most one of resume / init_from; finished says there is nothing to do."""

    resume: Path | None = None  # the checkpoint to continue
    init_from: init_source.InitSource | None = None  # whose weights start a new run
    step: int = 0  # the resumed checkpoint's step
    schedule_steps: int = 0  # the LR schedule's length
    clear: tuple[Path, ...] = ()  # the old run's files, removed first (train.overwrite=true)
    finished: str | None = None  # the nothing-to-do line
    exit_code: int = 0  # with finished
    notes: tuple[str, ...] = ()  # warnings for rank 0 to issue once
    damaged: tuple[str, ...] = ()  # a line for each damaged checkpoint passed over


def plan_start(cfg: XparConfig) -> Start:
    """The start plan for cfg and the files in its out_dir (reads, never writes)."""
    tc = cfg.train
    if tc.resume in ("auto", "force"):
        field = f"train.resume={tc.resume}"
        found, damaged = _newest_readable(Path(tc.out_dir).resolve() / "checkpoints", field)
        if found is not None:
            return dataclasses.replace(_resume_plan(cfg, found), damaged=damaged)
        return _fresh_plan(cfg)
    if tc.resume == "never":
        return _fresh_plan(cfg)
    if tc.init_from:
        raise XparConfigError(
            f"train.init_from={tc.init_from!r} and train.resume={tc.resume!r} both name a "
            "checkpoint: resume=<dir> continues a run, init_from starts a new one from its "
            "weights; keep one of them"
        )
    found = as_checkpoint(tc.resume, "train.resume")
    try:
        return _resume_plan(cfg, found)
    except ckpt.DamagedCheckpoint as e:  # the user named this one: no fallback
        raise ckpt.DamagedCheckpoint(
            f"train.resume={tc.resume!r}: {e.what}", ckpt.DAMAGED_FIX
        ) from e


def as_checkpoint(value: str, field: str) -> Path:
    """A step_* directory, a checkpoints/ directory (its latest) or an out_dir (ditto)."""
    p = Path(value).expanduser().resolve()
    for d in (p, p / "checkpoints"):
        if (d / ckpt.CLIENT_STATE).is_file():
            return d
        found = _latest(d, f"{field}={value!r}")
        if found is not None:
            return found
    raise XparConfigError(
        f"{field}={value!r} is not a checkpoint: it has no {ckpt.CLIENT_STATE} and no "
        f"checkpoints/{ckpt.LATEST} under it; name a step_* directory, a checkpoints/ "
        "directory or a run's out_dir"
    )


def _latest(root: Path, field: str) -> Path | None:
    try:
        return ckpt.latest(root)
    except FileNotFoundError as e:
        raise XparConfigError(f"{field}: {e}") from e


# When no checkpoint of a run can be resumed.
NONE_LOADS_FIX = (
    "restore the files from a copy, or start over with train.resume=never train.overwrite=true"
)


def _newest_readable(root: Path, field: str) -> tuple[Path | None, tuple[str, ...]]:
    """The newest checkpoint whose client_state.json verifies (`latest`, else an older complete
    one), and a line for each passed over; None when the run has no checkpoint."""
    try:
        newest = ckpt.latest(root)
    except FileNotFoundError as e:  # `latest` names garbage: every complete checkpoint
        newest, passed = None, [(root / ckpt.LATEST, str(e).split("; ")[0])]
        candidates = ckpt.complete(root)
        if not candidates:
            raise XparConfigError(f"{field}: {e}") from e
    else:
        if newest is None:
            return None, ()
        passed, candidates = [], ckpt.complete(root, upto=newest)
    for d in candidates:
        try:
            ckpt.read_client_state(d)
        except ckpt.DamagedCheckpoint as e:
            passed.append((d, f"checkpoint {d.name} is damaged: {e.what}"))
            continue
        return d, tuple(f"{field}: {why}; resuming {d} instead" for _, why in passed)
    raise ckpt.DamagedCheckpoint(
        f"{field}: no checkpoint under {root} can be resumed: "
        + "; ".join(why for _, why in passed),
        NONE_LOADS_FIX,
    )


def _resume_plan(cfg: XparConfig, found: Path) -> Start:
    tc = cfg.train
    shared = ckpt.read_client_state(found)
    step = shared["step"]
    # A checkpoint from before the length was recorded: this run's (the old behaviour).
    schedule_steps = int(shared.get("schedule_steps", tc.steps))
    notes = []
    if tc.init_from:
        notes.append(
            f"train.init_from={tc.init_from!r} is not used: resuming {found} at step {step} "
            "(a preempted or requeued fine-tune continues its own checkpoint); set a new "
            "train.out_dir to start another run from it"
        )
    if tc.overwrite:
        notes.append(
            f"train.overwrite=true is not used: train.resume={tc.resume} continues {found}; "
            "use train.resume=never train.overwrite=true to start over"
        )
    if step >= tc.steps:
        code = 0 if tc.noop_ok else EXIT_NOTHING_TO_DO
        finished = (
            f"xpar: nothing to do: {found} is at step {step} and train.steps={tc.steps}; "
            "raise train.steps to train on, or set a new train.out_dir (or logger.run_name) "
            f"for a new run (exit {code}; train.noop_ok=true exits 0)"
        )
        return Start(resume=found, step=step, finished=finished, exit_code=code)
    o = cfg.optim
    note = resume_note(
        schedule=o.schedule, saved_steps=schedule_steps, steps=tc.steps, min_lr=o.min_lr
    )
    notes += [note] if note else []
    return Start(resume=found, step=step, schedule_steps=schedule_steps, notes=tuple(notes))


def _fresh_plan(cfg: XparConfig) -> Start:
    tc = cfg.train
    out = Path(tc.out_dir).resolve()
    init = init_source.resolve(tc.init_from) if tc.init_from else None
    held = old_run_files(out)
    if held and not tc.overwrite:
        if tc.resume == "never":
            why = "train.resume=never would start a new run beside it"
            fix = ", train.resume=auto to continue it"
        else:
            why = (
                f"train.resume={tc.resume} found no checkpoint to continue, so a new run "
                "would start beside it"
            )
            fix = ""
        names = ", ".join(p.name for p in held)
        raise XparConfigError(
            f"train.out_dir={tc.out_dir!r} holds a run ({names}) and {why}; set "
            f"train.overwrite=true to delete the old run first{fix}, or a new train.out_dir "
            "(or logger.run_name)"
        )
    clear = tuple(p for p in (out / name for name in RUN_FILES) if p.exists()) if held else ()
    clear += tuple(out.glob(f"{_ASIDE}*"))  # an overwrite that crashed before its delete
    return Start(init_from=init, schedule_steps=tc.steps, clear=clear)


def old_run_files(out_dir: Path) -> list[Path]:
    """What shows that out_dir holds a run: checkpoints (published or partial), metrics."""
    held = []
    root = out_dir / "checkpoints"
    if (root / ckpt.LATEST).exists() or any(root.glob("step_*")):
        held.append(root)
    if (out_dir / METRICS_FILE).exists():
        held.append(out_dir / METRICS_FILE)
    return held


def loadable(cfg: XparConfig, start: Start, engine: Any) -> tuple[Start, dict]:
    """Collective, after the process group: the plan's checkpoint if every rank can read its
    part (xpar.train.checkpoint.read_rank_state), else, under train.resume=auto|force, the
    newest older complete one that every rank can; returns the plan for the checkpoint used
    and this rank's state of it. Rank 0 says which checkpoints were passed over, one line
    each. Nothing left, or train.resume=<dir> damaged: DamagedCheckpoint on every rank.
    """
    tc = cfg.train
    fallback = tc.resume in ("auto", "force")
    field = f"train.resume={tc.resume}" if fallback else f"train.resume={tc.resume!r}"
    order = ckpt.complete(start.resume.parent, upto=start.resume) if fallback else []
    order = [start.resume] + [d for d in order if d != start.resume]
    passed: list[tuple[Path, str]] = []
    for d in order:
        state, what = _read_on_every_rank(engine, d)
        if what is None:
            break
        if not fallback:
            raise ckpt.DamagedCheckpoint(f"{field}: {what}", ckpt.DAMAGED_FIX)
        passed.append((d, what))
    else:
        raise ckpt.DamagedCheckpoint(
            f"{field}: no checkpoint under {start.resume.parent} loads on every rank: "
            + "; ".join(what for _, what in passed),
            NONE_LOADS_FIX,
        )
    plan = start if d == start.resume else _resume_plan(cfg, d)
    lines = start.damaged + tuple(f"{field}: {what}; resuming {d} instead" for _, what in passed)
    if current_rank() == 0:
        for line in lines:
            warnings.warn(line, XparConfigWarning, stacklevel=2)
    return dataclasses.replace(plan, damaged=lines), state


_READ, _DAMAGED, _REFUSED = 0, 1, 2  # one rank's outcome; the worst over the ranks decides


def _read_on_every_rank(engine: Any, d: Path) -> tuple[dict | None, str | None]:
    """This rank's state of checkpoint d, or (None, what is wrong on which ranks) when a rank
    cannot read its part. One all-reduce when every rank can; a checkpoint saved with another
    layout (not damage) raises its XparConfigError on every rank."""
    state, what, outcome = None, None, _READ
    try:
        state = ckpt.read_rank_state(engine, d)
    except ckpt.DamagedCheckpoint as e:
        what, outcome = e.what, _DAMAGED
    except XparConfigError as e:
        what, outcome = str(e), _REFUSED
    worst = torch.tensor([outcome], dtype=torch.int64, device=engine.groups.device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if int(worst.item()) == _READ:
        return state, None
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, (outcome, what))
    if int(worst.item()) == _REFUSED:
        raise XparConfigError(next(w for o, w in every if o == _REFUSED))
    by_what: dict[str, list[int]] = {}
    for r, (o, w) in enumerate(every):
        if o == _DAMAGED:
            by_what.setdefault(w, []).append(r)
    said = "; ".join(f"{_ranks(rs)}: {w}" for w, rs in by_what.items())
    return None, f"checkpoint {d.name} is damaged ({said})"


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def announce(start: Start) -> None:
    """Rank 0 issues the plan's warnings (xpar's warning lines, repeated at the end)."""
    if current_rank() == 0:
        for note in start.notes:
            warnings.warn(note, XparConfigWarning, stacklevel=2)


def say_finished(start: Start) -> None:
    if current_rank() == 0 and start.finished:
        print(start.finished, file=sys.stderr, flush=True)


def clear_old_run(start: Start, rank: int) -> None:
    """Collective (when there is something to clear): rank 0 moves the old run's files aside,
    then deletes them; every rank waits, so nothing new is written beside an old file.

    Each move is one rename into a hidden folder of out_dir: a crash leaves every file
    either in place (the next overwrite takes it) or aside (the next overwrite deletes it),
    never a new run's file beside an old one's.
    """
    if not start.clear:
        return
    if rank == 0:
        out = start.clear[0].parent
        aside = out / f"{_ASIDE}{secrets.token_hex(4)}"
        aside.mkdir()
        for p in start.clear:
            p.rename(aside / p.name)
        shutil.rmtree(aside)
        names = [p.name for p in start.clear if not p.name.startswith(_ASIDE)]
        if names:
            print(
                f"train.overwrite=true: deleted the old run in {out} ({', '.join(names)})",
                flush=True,
            )
    dist.barrier()


@contextlib.contextmanager
def config_hyperparameters(scheduler: Any) -> Iterator[None]:
    """Load a checkpoint's optimizer (moments, step) but keep this run's hyperparameters.

    A loaded optimizer and LR scheduler carry the saved run's lr, betas, eps and weight
    decay; under train.resume=force the config's values are the ones asked for. `scheduler`
    is the engine's LambdaLR (None: nothing to keep). A value the checkpoint shares is left
    untouched, so an unchanged resume stays bitwise.
    """
    if scheduler is None:
        yield
        return
    keep = [
        {k: v for k, v in g.items() if k not in ("params", "lr")}
        for g in scheduler.optimizer.param_groups
    ]
    base = list(scheduler.base_lrs)
    yield
    groups = scheduler.optimizer.param_groups  # loading replaces the group dicts
    for g, want in zip(groups, keep, strict=True):
        g.update({k: v for k, v in want.items() if g.get(k) != v})
    if list(scheduler.base_lrs) != base:
        scheduler.base_lrs = base
        for g, b, fn in zip(groups, base, scheduler.lr_lambdas, strict=True):
            g["lr"] = b * fn(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in groups]  # what get_last_lr() reports
