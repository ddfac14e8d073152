"""Checkpoints: directories under <out_dir>/checkpoints, per-rank files, an atomic `latest`.

    checkpoints/
      step_00000006/   rank<NNNNN>.pt (every rank: module incl. its experts, optimizer,
                       LR scheduler, engine counters, this rank's client state),
                       xpar_parallel.json (rank 0: the layout, library versions),
                       universal<NNNNN>.pt, universal.json (every rank's share of the
                       layout-free state and rank 0's index: xpar.train.reshard),
                       client_state.json (rank 0, written last: step, data position, LR
                       schedule length, run record); beside each file <name>.sum.json,
                       its size and sha256, written by the rank that wrote the file
      latest           "step_00000006": replaced (write, fsync, rename) only after
                       every rank finished writing that step

A crash at any point leaves `latest` naming a complete checkpoint (or absent). Every
file goes through the one atomic writer, so no reader ever sees half a file; a write that
fails (a full disk) raises CheckpointWriteError naming the file and the errno, leaves no
temp file, and `latest` stays on the previous checkpoint.

Integrity: each file's size and sha256 are computed as it is written (no second read) and
checked before it is read; a file that is missing, truncated, changed or unreadable raises
DamagedCheckpoint naming it, what was expected and what was found. A checkpoint written
before the checksums (tests/fixtures/ckpt_v1: no *.sum.json in its directory) is read
without them. Which checkpoint a run resumes when one is damaged is xpar.train.resume's.

Pruning (train.keep_checkpoints=K) keeps `latest` and the newest sound checkpoints, K in
all: sound is complete (client_state.json) and intact as far as rank 0 can tell without
reading every rank file (its client_state.json verifies; every file rank 0 can see has the
size its checksum file records). The checkpoint a damaged `latest` would fall back to is
therefore kept; partial and damaged directories older than `latest` are deleted, and
directories newer than `latest` (a crashed save, rewritten by the next save) are left.

The resume guard (does a checkpoint fit this run?) is xpar.train.resume_guard. A resume
at the layout that saved (world size, ep_size, ZeRO stage, precision) reads the rank files
(bitwise); at another layout it reads the universal state instead (xpar.train.reshard), and
rank 0 says in one line what was resharded and what of the data and RNG carries over.

train.init_from reads checkpoints through xpar.train.saved_model (whole expert banks, any
EP size), not through this module.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import torch
import torch.distributed as dist

from xpar.config.store import XparConfigWarning
from xpar.errors import XparConfigError
from xpar.train import faults
from xpar.train.resume_guard import check_resumable

if TYPE_CHECKING:
    from xpar.parallel.deepspeed import XparEngine

FORMAT = 1  # of the rank files; a reader of format N reads every format <= N
LATEST = "latest"
CLIENT_STATE = "client_state.json"
LAYOUT_FILE = "xpar_parallel.json"
SUMS = ".sum.json"  # beside each file: {"file", "bytes", "sha256"}
_SHOWN = 16  # hex digits of a sha256 shown in a message


class DamagedCheckpoint(XparConfigError):
    """A checkpoint file that is missing, truncated, changed since it was written (its
    checksum) or unreadable. `what` names the file and the problem; the message adds the fix.
    """

    def __init__(self, what: str, fix: str = ""):
        self.what = what
        super().__init__(f"{what}; {fix}" if fix else what)


class CheckpointWriteError(OSError):
    """A checkpoint file could not be written (errno kept: ENOSPC for a full disk)."""


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def rank_file(directory: str | Path, rank: int) -> Path:
    return Path(directory) / f"rank{rank:05d}.pt"


def sum_file(path: str | Path) -> Path:
    """The checksum file beside `path`."""
    path = Path(path)
    return path.with_name(path.name + SUMS)


# --------------------------------------------------------------------------- atomic files


def write_atomic(path: str | Path, content: str | Callable[[Path], None]) -> None:
    """Write (text, or `content(tmp_path)`), fsync, rename, fsync the directory.

    Readers see the old file or the new one, never a part; a failed write leaves no temp
    file and raises CheckpointWriteError (an OSError) naming the file and the errno.
    """
    if isinstance(content, str):
        text = content

        def content(tmp: Path) -> None:
            tmp.write_text(text, encoding="utf-8")

    _replace(Path(path), content)


def write_checked(path: str | Path, content: str | Callable[[BinaryIO], None]) -> None:
    """write_atomic, hashing what is written (text, or `content(binary_file)`), then the
    checksum file beside it. A reader that finds the file without its checksum file knows
    the write did not finish."""
    path = Path(path)
    if isinstance(content, str):
        data = content.encode("utf-8")

        def content(f: BinaryIO) -> None:
            f.write(data)

    seen = _Digesting(content)
    _replace(path, seen.fill)
    record = {"file": path.name, "bytes": seen.size, "sha256": seen.sha.hexdigest()}
    write_atomic(sum_file(path), json.dumps(record) + "\n")


class _Digesting:
    """Writes through a file that hashes what passes; keeps the OSError that torch.save
    turns into a RuntimeError without the errno."""

    def __init__(self, content: Callable[[BinaryIO], None]):
        self.content, self.sha, self.size = content, hashlib.sha256(), 0
        self.error: OSError | None = None
        self._f: BinaryIO | None = None

    def fill(self, tmp: Path) -> None:
        with open(tmp, "wb") as self._f:
            try:
                self.content(self)  # type: ignore[arg-type]
            except Exception as e:
                if self.error is not None and e is not self.error:
                    raise self.error from e
                raise

    def write(self, data) -> int:
        view = memoryview(data)
        try:
            n = self._f.write(view)
        except OSError as e:
            self.error = e
            raise
        self.sha.update(view)
        self.size += view.nbytes
        return n

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as e:
            self.error = e
            raise


def _replace(path: Path, fill: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fill(tmp)
        faults.active().before_replace(path)  # XPAR_TEST_ENOSPC_AT_SAVE
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, CheckpointWriteError):
            raise _write_error(path, e) from e
        raise


def _write_error(path: Path, e: OSError) -> CheckpointWriteError:
    code = errno.errorcode.get(e.errno, "no errno") if e.errno else "no errno"
    why = e.strerror or str(e)
    return CheckpointWriteError(
        e.errno,
        f"could not write checkpoint file {path}: {code} ({why}); nothing new was published "
        f"and `latest` still names the previous checkpoint; free space (or fix the file "
        f"system) under {path.parent.parent} and rerun to resume from it",
    )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_client_state(directory: str | Path, state: dict) -> None:
    write_checked(Path(directory) / CLIENT_STATE, json.dumps(state, indent=1, sort_keys=True))


def read_client_state(directory: str | Path) -> dict:
    """client_state.json, verified (DamagedCheckpoint when missing, changed or not JSON)."""
    path = Path(directory) / CLIENT_STATE
    problem = file_problem(path)
    if problem is not None:
        raise DamagedCheckpoint(problem)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise DamagedCheckpoint(f"{path} cannot be read as JSON ({e})") from e
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise DamagedCheckpoint(f"{path} holds no step number (not a checkpoint's client state)")
    return state


# --------------------------------------------------------------------------- checksums


def digest(path: str | Path) -> tuple[int, str]:
    """(size, sha256 hex) of a file, as its checksum file records them."""
    with open(path, "rb") as f:
        sha = hashlib.file_digest(f, "sha256")
    return os.path.getsize(path), sha.hexdigest()


def has_checksums(directory: str | Path) -> bool:
    """Whether the directory's files were written with checksum files (not an old checkpoint)."""
    return any(Path(directory).glob(f"*{SUMS}"))


def file_problem(path: str | Path, *, deep: bool = True) -> str | None:
    """What is wrong with a checkpoint file ("<path> is ..."), or None when it is intact.

    Checked against its checksum file when its directory has them (an older checkpoint has
    none: then only that it exists). `deep=False` compares the size only (no read).
    """
    path = Path(path)
    if not path.is_file():
        return f"{path} is missing"
    side = sum_file(path)
    if not side.is_file():
        if has_checksums(path.parent):
            return f"{path} has no checksum file {side.name} (its write did not finish)"
        return None
    try:
        want = json.loads(side.read_text(encoding="utf-8"))
        size, sha = int(want["bytes"]), str(want["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path} has an unreadable checksum file {side.name} ({e!r})"
    have = path.stat().st_size
    if have != size:
        how = "truncated" if have < size else "it grew after it was written"
        return f"{path} is {have} bytes, expected {size} ({how})"
    if not deep:
        return None
    found = digest(path)[1]
    if found != sha:
        return (
            f"{path} has sha256 {found[:_SHOWN]}..., expected {sha[:_SHOWN]}... "
            "(its bytes changed after it was written)"
        )
    return None


# --------------------------------------------------------------------------- latest, prune


def publish(root: str | Path, step: int) -> None:
    """Point `latest` at step (call on rank 0 after a barrier that follows every rank's save)."""
    write_atomic(Path(root) / LATEST, step_dir(root, step).name + "\n")


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8", errors="replace").strip()
    d = Path(root) / name
    if not name or "/" in name or not (d / CLIENT_STATE).is_file():
        raise FileNotFoundError(
            f"{pointer} names {name[:80]!r}, which is not a complete checkpoint; "
            "delete the pointer to start over or fix it to name a complete step_* directory"
        )
    return d


def complete(root: str | Path, upto: Path | None = None) -> list[Path]:
    """The step_* directories holding client_state.json (written last), newest first; with
    `upto`, that one and older (newer ones were never published)."""
    dirs = [p for p in Path(root).glob("step_*") if (p / CLIENT_STATE).is_file()]
    if upto is not None:
        dirs = [p for p in dirs if p.name <= upto.name]
    return sorted(dirs, reverse=True)


def sound(directory: str | Path) -> bool:
    """Complete and intact as far as this rank sees without reading the big files: its
    client_state.json verifies, every file with a checksum file has the recorded size."""
    d = Path(directory)
    try:
        read_client_state(d)
    except DamagedCheckpoint:
        return False
    files = [p.with_name(p.name[: -len(SUMS)]) for p in d.glob(f"*{SUMS}")]
    return all(file_problem(f, deep=False) is None for f in files)


def prune(root: str | Path, keep: int) -> list[Path]:
    """Delete old checkpoints: keep the one `latest` names and the newest sound ones,
    `keep` in all (see the module doc); return what was deleted."""
    root = Path(root)
    current = latest(root)
    dirs = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    if current is not None:
        # Unpublished directories newer than `latest` are partial writes of a crashed run.
        dirs = [p for p in dirs if p.name <= current.name]
    kept = [current] if current is not None else []
    for p in dirs:
        if p != current and len(kept) < keep and sound(p):
            kept.append(p)
    doomed = sorted(p for p in dirs if p not in kept)
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
    rank reads back its own file). Rewriting a directory a crashed run left first removes
    its client_state.json, so it is never complete with a mix of old and new rank files.
    """
    directory = Path(directory)
    rank = engine.groups.rank
    directory.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        for stale in (directory / CLIENT_STATE, sum_file(directory / CLIENT_STATE)):
            stale.unlink(missing_ok=True)
    dist.barrier()  # nobody writes into a directory that still looks complete
    path = rank_file(directory, rank)
    for tmp in directory.glob(f".{path.name}.tmp-*"):  # this rank's, from a killed save
        tmp.unlink(missing_ok=True)
    layout = _layout(engine)
    state = {"layout": layout, "rank": rank, **engine.state_dict()}
    state["client_state"] = client_state or {}
    write_checked(path, lambda f: torch.save(state, f))
    if rank == 0:
        meta = {**layout, **engine.versions()}
        write_checked(directory / LAYOUT_FILE, json.dumps(meta, indent=1))
    reshard().save(engine, directory, layout, state["client_state"])  # collective
    dist.barrier()


def load(
    engine: XparEngine,
    directory: str | Path,
    run: Mapping | None = None,
    *,
    force: bool = False,
    state: dict | None = None,
) -> dict:
    """Collective: restore what `save` wrote into this engine; returns this rank's client_state.

    An engine built like the one that saved (world size, ep_size, ZeRO stage, precision)
    gets the rank file's state; another layout gets the universal state (xpar.train.reshard,
    one line on rank 0 says so). The model must be one the weights fit (see check_resumable).
    `run` is this run's `run_record(...)`, compared with the one in client_state.json: a
    difference is refused unless `force` (train.resume=force), which warns once on rank 0.
    `state` is this rank's file as `read_rank_state` returned it (read here when None).
    """
    directory = Path(directory)
    where = f"train.resume={str(directory)!r}"
    if state is None:
        try:
            state = read_rank_state(engine, directory)
        except DamagedCheckpoint as e:
            raise DamagedCheckpoint(f"{where}: {e.what}", DAMAGED_FIX) from e
    saved_run = read_client_state(directory) if run is not None else None
    resharding = reshard().is_reshard(state)
    if resharding:
        saved_shapes, now_shapes = reshard().shapes(engine, state["reshard"])
    else:
        saved_shapes, now_shapes = state["module"], engine.module.state_dict()
    world = engine.groups.world_size
    changed = check_resumable(
        directory, saved_shapes, now_shapes, saved_run, run, force=force, world_size=world
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
        if resharding:
            client_state = reshard().load(engine, directory, state)
        else:
            engine.load_state_dict(state)
            client_state = state["client_state"]
    except XparConfigError as e:
        raise XparConfigError(f"{where}: {e}") from e
    if resharding and engine.groups.rank == 0:
        shared = saved_run if saved_run is not None else _shared_or_empty(directory)
        line = reshard().describe(directory, state["layout"], _layout(engine), shared, run)
        print(line, flush=True)
    dist.barrier()
    return client_state


def reshard():
    """xpar.train.reshard, imported when first used (it builds on this module)."""
    from xpar.train import reshard as module

    return module


def _shared_or_empty(directory: Path) -> dict:
    return read_client_state(directory) if (directory / CLIENT_STATE).is_file() else {}


# The fix for a damaged checkpoint the user named (train.resume=<dir>: no fallback).
DAMAGED_FIX = (
    "the checkpoint is damaged: name an older one (train.resume=<its step_* directory>), or "
    "set train.resume=auto to resume the newest checkpoint that loads on every rank"
)


def read_rank_state(engine: XparEngine, directory: str | Path) -> dict:
    """This rank's part of a checkpoint, verified before it is read: client_state.json, the
    rank file (and on rank 0 the layout record). Rank-local: no collective.

    At another layout (world size, ep_size, ZeRO stage, precision) this rank's share of the
    universal state instead (xpar.train.reshard.read_share: verified, not yet read).

    Raises DamagedCheckpoint (a file missing, truncated, changed or unreadable) or
    XparConfigError (saved with another layout before checkpoints carried the universal
    state: not damage, resume like it).
    """
    directory = Path(directory)
    rank = engine.groups.rank
    if reshard().has_universal(directory):
        index = reshard().read_index(directory)
        if index["layout"] != _layout(engine):
            return reshard().read_share(engine, directory, index)
    path = rank_file(directory, rank)
    # Always there in a trainer's checkpoint (written last); an engine-only save has none.
    shared = read_client_state(directory) if (directory / CLIENT_STATE).is_file() else {}
    if not path.is_file():
        saved = shared.get("world_size")
        if saved == engine.groups.world_size:
            raise DamagedCheckpoint(f"{path} is missing (rank {rank}'s file of {saved})")
        raise XparConfigError(
            f"train.resume={str(directory)!r}: no checkpoint file {path.name} for rank "
            f"{rank} (a checkpoint from before resharding); resume with the world size the "
            "checkpoint was saved with" + (f" ({saved})" if saved else "")
        )
    if rank == 0:
        problem = file_problem(directory / LAYOUT_FILE)
        if problem is not None:
            raise DamagedCheckpoint(problem)
    state = _verified_load(path, engine.safe_globals())
    want, have = _layout(engine), state["layout"]
    if want != have or state["rank"] != rank:
        raise XparConfigError(
            f"train.resume={str(directory)!r} was saved with {have} (rank {state['rank']}) but "
            f"this run is {want} (rank {rank}), and it has no universal state (written before "
            "resharding); resume with the same world size, parallel.ep_size, "
            "parallel.zero_stage and parallel.precision"
        )
    return state


def _verified_load(path: Path, safe_globals: list) -> dict:
    problem = file_problem(path)
    if problem is not None:
        raise DamagedCheckpoint(problem)
    try:
        with torch.serialization.safe_globals(safe_globals):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file of an old checkpoint (no checksum) fails here
        why = " ".join(str(e).split())[:200]
        raise DamagedCheckpoint(f"{path} cannot be read by torch.load ({why})") from e
    if not isinstance(state, dict) or "layout" not in state or "module" not in state:
        raise DamagedCheckpoint(f"{path} holds no xpar rank state")
    return state
