"""Token cache: one directory per cache key, built once under a file lock, published by rename.

Every rank may call `build_or_load` at once, with or without torch.distributed: the first
to take the lock builds into a private temp directory and renames it into place; the
others wait on the lock and then find the finished directory. A crash leaves only a temp
directory behind, never a half-written cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable

from filelock import FileLock, Timeout

from xpar.errors import XparConfigError

META = "meta.json"
LOCK_TIMEOUT_S = 6 * 3600.0


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "xpar", "data")


def cache_key(parts: dict) -> str:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def build_or_load(root: str, key: str, build: Callable[[str], dict]) -> tuple[str, dict, bool]:
    """(directory, meta, hit). `build(tmp_dir)` fills tmp_dir and returns the meta dict."""
    final = os.path.join(root, key)
    meta = _read_meta(final)
    if meta is not None:
        return final, meta, True
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise XparConfigError(
            f"data.cache_dir={root!r} is invalid: cannot create it ({e}); "
            "point data.cache_dir at a writable directory"
        ) from e
    try:
        with FileLock(os.path.join(root, key + ".lock"), timeout=LOCK_TIMEOUT_S):
            meta = _read_meta(final)
            if meta is not None:
                return final, meta, True  # another process built it while we waited
            tmp = os.path.join(root, f"{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.makedirs(tmp)
            try:
                t0 = time.perf_counter()
                meta = dict(build(tmp))
                meta["build_s"] = round(time.perf_counter() - t0, 3)
                with open(os.path.join(tmp, META), "w") as f:
                    json.dump(meta, f, indent=1, sort_keys=True)
                if os.path.isdir(final):  # a stale, meta-less leftover
                    shutil.rmtree(final)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except Timeout as e:
        raise XparConfigError(
            f"data.cache_dir={root!r}: waited {LOCK_TIMEOUT_S:.0f}s for another process to "
            f"build {key}; remove {key}.lock there if no build is running"
        ) from e
    return final, meta, False


def _read_meta(directory: str) -> dict | None:
    try:
        with open(os.path.join(directory, META)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
