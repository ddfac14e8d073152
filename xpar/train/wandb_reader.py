"""Read an offline W&B run back from disk: the leveldb-log framing and wandb's protobuf records.

Tests use it to check what was really written; the quality benchmark reads its curves with it.

A .wandb file is a leveldb log: a 7-byte header (":W&B", uint16 magic 0xBEE1, uint8
version 0), then 32 KiB blocks of chunks, each chunk = crc32 (zlib, seeded with the
crc of the type byte), uint16 length, uint8 type (1 full, 2 first, 3 middle, 4 last),
payload. A block tail shorter than a chunk header is zero padding. Payloads join into
serialized wandb.proto Record messages.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["has_exit_record", "read_offline_run"]


_BLOCK = 32768
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _iter_payloads(data: bytes, path: Path) -> Iterator[bytes]:
    if len(data) < 7 or data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B offline run file (bad header)")
    magic, version = struct.unpack("<HB", data[4:7])
    if magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path}: unknown W&B file magic {magic:#x} / version {version}")
    off, parts = 7, []
    while off + _CHUNK_HEADER <= len(data):
        left_in_block = _BLOCK - off % _BLOCK
        if left_in_block < _CHUNK_HEADER:
            off += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[off : off + _CHUNK_HEADER])
        if kind == 0 and length == 0:  # zero padding at a block's end
            off += left_in_block
            continue
        payload = data[off + _CHUNK_HEADER : off + _CHUNK_HEADER + length]
        if len(payload) < length:
            break  # a write cut short (crash): keep what was complete
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: checksum mismatch at byte {off}")
        off += _CHUNK_HEADER + length
        if kind == _FULL:
            yield payload
        elif kind == _FIRST:
            parts = [payload]
        elif kind == _MIDDLE:
            parts.append(payload)
        elif kind == _LAST:
            parts.append(payload)
            yield b"".join(parts)
            parts = []
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {off}")


def _set_nested(target: dict, item: Any, value: Any) -> None:
    path = [item.key] if item.key else list(item.nested_key)
    for k in path[:-1]:
        target = target.setdefault(k, {})
    target[path[-1]] = value


def _del_nested(target: dict, item: Any) -> None:
    path = [item.key] if item.key else list(item.nested_key)
    for k in path[:-1]:
        target = target.get(k, {})
    target.pop(path[-1], None)


def _history_value(item: Any) -> Any:
    if item.value_json:
        return json.loads(item.value_json)
    kind = item.WhichOneof("value")
    if kind is None or kind == "none":
        return None
    if kind == "json":
        return json.loads(item.json)
    return getattr(item, kind)


def _read_one(path: Path) -> dict[str, Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    run: dict[str, Any] = {"run_id": None, "config": {}, "history": [], "summary": {}}
    start = 0.0
    for payload in _iter_payloads(path.read_bytes(), path):
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run["run_id"] = rec.run.run_id
            start = rec.run.start_time.seconds + rec.run.start_time.nanos * 1e-9
            for item in rec.run.config.update:
                _set_nested(run["config"], item, json.loads(item.value_json))
        elif kind == "config":
            for item in rec.config.update:
                _set_nested(run["config"], item, json.loads(item.value_json))
            for item in rec.config.remove:
                _del_nested(run["config"], item)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in rec.history.item:
                _set_nested(row, item, _history_value(item))
            run["history"].append(row)
        elif kind == "summary":
            for item in rec.summary.update:
                _set_nested(run["summary"], item, json.loads(item.value_json))
            for item in rec.summary.remove:
                _del_nested(run["summary"], item)
    run["config"].pop("_wandb", None)
    run["start_time"] = start
    return run


def has_exit_record(path: Path) -> bool:
    """Whether a .wandb file holds its closing (exit) record yet: the run is complete on disk."""
    from wandb.proto import wandb_internal_pb2 as pb

    for payload in _iter_payloads(path.read_bytes(), path):
        rec = pb.Record()
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") == "exit":
            return True
    return False


def read_offline_run(path: str | os.PathLike) -> dict[str, Any]:
    """Read an offline W&B run back from disk.

    path: a .wandb file, an offline run folder, or any folder above (e.g. the trainer's
    run_dir): every .wandb file below it is read. Several files (a run resumed under the
    same id writes one folder per process) are put in start order and joined; they must
    share one run id.

    Returns {"run_id": str, "config": dict (W&B's own "_wandb" key left out),
    "history": [row, ...] (one dict per logged step, keys as logged, e.g. "train/loss",
    "_step"; a histogram is {"_type": "histogram", "values": [...], "bins": [...]}),
    "summary": dict, "files": [Path, ...]}.
    """
    root = Path(path)
    files = [root] if root.is_file() else sorted(root.rglob("*.wandb"))
    if not files:
        raise FileNotFoundError(f"no .wandb file under {root}")
    runs = sorted(((_read_one(f), f) for f in files), key=lambda rf: (rf[0]["start_time"], rf[1]))
    # A segment killed before W&B flushed (SIGKILL, node loss) has no run record: skip it
    # when a later segment of the run exists, fail when nothing is readable.
    skipped = [f for r, f in runs if not r["run_id"]]
    runs = [(r, f) for r, f in runs if r["run_id"]]
    if not runs:
        raise ValueError(f"{skipped[0]}: no run record yet (run still starting, or file cut short)")
    ids = sorted({r["run_id"] for r, _ in runs})
    if len(ids) != 1:
        raise ValueError(f"{root} holds runs with different ids {ids}: pass one run's folder")
    out: dict[str, Any] = {"run_id": ids[0], "config": {}, "history": [], "summary": {}}
    for r, _ in runs:
        out["config"].update(r["config"])
        out["history"].extend(r["history"])
        out["summary"].update(r["summary"])
    out["files"] = [f for _, f in runs]
    out["skipped"] = skipped
    return out
