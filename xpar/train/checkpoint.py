"""Checkpoint directories under <out_dir>/checkpoints with an atomic `latest` pointer.

    checkpoints/
      step_00000006/   rank<NNNNN>.pt (every rank, via the DeepSpeed adapter),
                       meta.json, client_state.json (rank 0)
      latest           "step_00000006": replaced (write, fsync, rename) only after
                       every rank finished writing that step

A crash at any point leaves `latest` naming a complete checkpoint (or absent).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

LATEST = "latest"
CLIENT_STATE = "client_state.json"


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def write_atomic(path: str | Path, text: str) -> None:
    """Write, fsync, rename, fsync the directory: readers see the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_client_state(directory: str | Path, state: dict) -> None:
    write_atomic(Path(directory) / CLIENT_STATE, json.dumps(state, indent=1, sort_keys=True))


def read_client_state(directory: str | Path) -> dict:
    with open(Path(directory) / CLIENT_STATE, encoding="utf-8") as f:
        return json.load(f)


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
