"""stdlib_code: classify a chunk of Python source by the standard-library package it is from.

    python -m xpar.data.tasks.stdlib_code --out DIR [--chunk-bytes 512] [--packages a b ...]
    directory, meta = ensure_task(cache_root)      # built once into a cache, then reused

Built from this interpreter's own standard library (sysconfig's stdlib path), so it needs
no download and is the same on every machine with the same Python. Writes train.jsonl and
val.jsonl (one {"text", "label", "file"} object per line; label = the top-level package)
and meta.json (labels, rows and files per split and label, a hash of the sources).

- Files: every .py under <stdlib>/<package>/, test directories left out (their code is
  about testing, not about the package).
- Chunks: whole lines gathered up to chunk_bytes UTF-8 bytes (a longer line is cut);
  chunks under chunk_bytes // 4 bytes (a file's short tail) are dropped.
- Split by file, never by chunk: per package, files walked in the order of a seeded hash
  of their path; a file goes to validation when it fits in what is left of val_fraction
  of the package's bytes (the smallest when none fits), and at least one file stays in
  train (a file is taken when it brings the validation bytes closer to the target). No
  file has chunks in both splits.
- Balanced: every label gets the same number of rows in a split (the smallest package's
  count there, capped by max_per_class for train), a seeded sample of its chunks.
Rows are shuffled with the seed; every choice is seeded, so the output is byte-identical
from run to run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import sysconfig

import numpy as np

from xpar.data import cache
from xpar.errors import XparConfigError

NAME = "stdlib_code"
VERSION = 1  # bump when the output for the same options changes
# Packages of every CPython 3.10..3.13 install with over 150 KB of source outside tests,
# in 3 or more files, so that both splits get a fair share of every one (urllib's two
# large files leave its validation side too small; tkinter is missing from some distros).
DEFAULT_PACKAGES = (
    "asyncio",
    "email",
    "http",
    "importlib",
    "logging",
    "multiprocessing",
    "unittest",
    "xml",
)
TEST_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__"})
SPLITS = ("train", "val")


def stdlib_root() -> str:
    return os.path.realpath(sysconfig.get_paths()["stdlib"])


def package_files(package: str, root: str | None = None) -> list[str]:
    """Relative paths ("/"-separated, from the stdlib root) of the package's .py files."""
    root = root or stdlib_root()
    top = os.path.join(root, package)
    if not os.path.isdir(top):
        raise XparConfigError(
            f"stdlib_code: package {package!r} is not a directory of this Python's standard "
            f"library ({root}); choose packages that exist, e.g. {', '.join(DEFAULT_PACKAGES)}"
        )
    out = []
    for d, dirs, names in os.walk(top):
        dirs[:] = sorted(x for x in dirs if x not in TEST_DIRS and not x.startswith("."))
        for n in names:
            if n.endswith(".py"):
                out.append(os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/"))
    return sorted(out)


def chunk_source(text: str, chunk_bytes: int) -> list[str]:
    """Whole lines gathered into chunks of at most chunk_bytes UTF-8 bytes (a longer line is
    cut at a character boundary); chunks under chunk_bytes // 4 bytes or blank are dropped."""
    pieces: list[bytes] = []
    for line in text.splitlines(keepends=True):
        b = line.encode("utf-8")
        while len(b) > chunk_bytes:
            cut = chunk_bytes
            while b[cut] & 0xC0 == 0x80:  # not in the middle of a character
                cut -= 1
            pieces.append(b[:cut])
            b = b[cut:]
        pieces.append(b)
    chunks, cur = [], b""
    for p in pieces:
        if cur and len(cur) + len(p) > chunk_bytes:
            chunks.append(cur)
            cur = b""
        cur += p
    if cur:
        chunks.append(cur)
    keep = max(1, chunk_bytes // 4)
    return [c.decode("utf-8") for c in chunks if len(c) >= keep and c.strip()]


def _order_key(seed: int, relpath: str) -> bytes:
    return hashlib.blake2b(f"{seed}:{relpath}".encode(), digest_size=8).digest()


def split_files(files: dict[str, int], val_fraction: float, seed: int) -> list[str]:
    """The validation files of one package (relpath -> bytes); never all, at least one."""
    if len(files) < 2:
        raise XparConfigError(
            f"stdlib_code: {sorted(files)} is a single file: a package needs 2 or more files "
            "to appear in both splits; choose packages with more files"
        )
    order = sorted(files, key=lambda f: (_order_key(seed, f), f))
    budget, used, val = val_fraction * sum(files.values()), 0, []
    for f in order:
        if len(val) == len(order) - 1:
            break
        # Take a file when it brings the validation bytes closer to the budget.
        if abs(used + files[f] - budget) < abs(used - budget):
            val.append(f)
            used += files[f]
    return val or [min(order, key=lambda f: (files[f], f))]


def _read(root: str, relpath: str) -> bytes:
    with open(os.path.join(root, relpath), "rb") as f:
        return f.read()


def _sample(rows: list, n: int, rng: np.random.Generator) -> list:
    """n rows (n <= len), in their original order."""
    keep = np.sort(rng.choice(len(rows), size=n, replace=False))
    return [rows[i] for i in keep]


def collect(
    packages, *, chunk_bytes: int, val_fraction: float, seed: int, root: str
) -> tuple[dict[str, dict[str, list]], str]:
    """rows[split][label] = [(file, text), ...] before balancing, and the sources' hash."""
    rows: dict[str, dict[str, list]] = {s: {} for s in SPLITS}
    h = hashlib.sha256(f"v{VERSION}".encode())
    for pkg in sorted(set(packages)):
        data = {f: _read(root, f) for f in package_files(pkg, root)}
        for f in sorted(data):
            h.update(f"{f}\0{len(data[f])}\0".encode())
            h.update(data[f])
        chunks = {
            f: chunk_source(b.decode("utf-8", "replace"), chunk_bytes) for f, b in data.items()
        }
        usable = {f: len(data[f]) for f in data if chunks[f]}
        val = set(split_files(usable, val_fraction, seed))
        for split in SPLITS:
            files = sorted(f for f in usable if (f in val) == (split == "val"))
            rows[split][pkg] = [(f, c) for f in files for c in chunks[f]]
    return rows, h.hexdigest()


def build_task(
    out_dir: str,
    *,
    chunk_bytes: int = 512,
    packages=DEFAULT_PACKAGES,
    seed: int = 0,
    val_fraction: float = 0.2,
    max_per_class: int = 1000,
    write_meta: bool = True,
) -> dict:
    """Write train.jsonl and val.jsonl (and meta.json) into out_dir; returns the meta dict."""
    _check_options(chunk_bytes, packages, val_fraction, max_per_class)
    root = stdlib_root()
    rows, source_hash = collect(
        packages, chunk_bytes=chunk_bytes, val_fraction=val_fraction, seed=seed, root=root
    )
    labels = sorted(rows["train"])
    meta: dict = {
        "task": NAME,
        "version": VERSION,
        "labels": labels,
        "chunk_bytes": chunk_bytes,
        "seed": seed,
        "val_fraction": val_fraction,
        "max_per_class": max_per_class,
        "python": sys.version.split()[0],
        "stdlib": root,
        "source_hash": source_hash,
        "rows": {},
        "files": {},
    }
    os.makedirs(out_dir, exist_ok=True)
    for si, split in enumerate(SPLITS):
        per = rows[split]
        n = min(len(per[label]) for label in labels)
        if split == "train" and max_per_class:
            n = min(n, max_per_class)
        out = []
        for li, label in enumerate(labels):
            picked = _sample(per[label], n, np.random.default_rng([seed, si, li]))
            out += [{"text": c, "label": label, "file": f} for f, c in picked]
        order = np.random.default_rng([seed, si, len(labels)]).permutation(len(out))
        with open(os.path.join(out_dir, f"{split}.jsonl"), "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(out[i]) + "\n" for i in order)
        meta["rows"][split] = {label: n for label in labels}
        meta["files"][split] = {label: len({f for f, _ in per[label]}) for label in labels}
    if write_meta:
        with open(os.path.join(out_dir, cache.META), "w") as fh:
            json.dump(meta, fh, indent=1, sort_keys=True)
    return meta


def _check_options(chunk_bytes, packages, val_fraction, max_per_class) -> None:
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 16:
        raise XparConfigError(
            f"stdlib_code: chunk_bytes={chunk_bytes!r} is invalid: use an integer >= 16"
        )
    if isinstance(packages, str) or len(set(packages)) < 2:
        raise XparConfigError(
            f"stdlib_code: packages={packages!r} is invalid: name at least 2 distinct "
            "standard-library packages"
        )
    if not 0.0 < val_fraction < 1.0:
        raise XparConfigError(
            f"stdlib_code: val_fraction={val_fraction!r} is invalid: use a number in (0, 1)"
        )
    if isinstance(max_per_class, bool) or not isinstance(max_per_class, int) or max_per_class < 0:
        raise XparConfigError(
            f"stdlib_code: max_per_class={max_per_class!r} is invalid: use 0 (no cap) or an "
            "integer >= 1"
        )


def ensure_task(cache_root: str, **options) -> tuple[str, dict]:
    """(directory, meta) of the task built with `options` (build_task's keywords) under
    cache_root/tasks/stdlib_code/<key>: built once under a file lock (safe for every rank
    at once), then found. The key covers the options, the Python version and the sources."""
    opts = {
        "chunk_bytes": 512,
        "packages": list(DEFAULT_PACKAGES),
        "seed": 0,
        "val_fraction": 0.2,
        "max_per_class": 1000,
        **options,
    }
    opts["packages"] = sorted(set(opts["packages"]))
    _check_options(
        opts["chunk_bytes"], opts["packages"], opts["val_fraction"], opts["max_per_class"]
    )
    root = stdlib_root()
    h = hashlib.sha256()
    for pkg in opts["packages"]:
        for f in package_files(pkg, root):
            st = os.stat(os.path.join(root, f))
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    key = cache.cache_key(
        {"task": NAME, "version": VERSION, "python": sys.version, "files": h.hexdigest(), **opts}
    )
    where = os.path.join(cache_root, "tasks", NAME)
    directory, meta, _ = cache.build_or_load(
        where, key, lambda tmp: build_task(tmp, write_meta=False, **opts)
    )
    return directory, meta


def summary(meta: dict, out_dir: str) -> str:
    labels, rows, files = meta["labels"], meta["rows"], meta["files"]
    parts = [
        f"{split} {sum(rows[split].values())} rows ({rows[split][labels[0]]} per label) from "
        f"{sum(files[split].values())} files"
        for split in SPLITS
    ]
    return (
        f"{NAME}: {len(labels)} labels ({', '.join(labels)}); {'; '.join(parts)}; chunks <= "
        f"{meta['chunk_bytes']} bytes; Python {meta['python']} -> {out_dir}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=f"python -m xpar.data.tasks.{NAME}", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", required=True, help="directory for train.jsonl, val.jsonl, meta.json")
    p.add_argument("--chunk-bytes", type=int, default=512, help="largest chunk (UTF-8 bytes)")
    p.add_argument(
        "--packages",
        nargs="+",
        default=list(DEFAULT_PACKAGES),
        help="top-level stdlib packages, the labels (space- or comma-separated)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of each package's bytes")
    p.add_argument("--max-per-class", type=int, default=1000, help="train rows per label (0: all)")
    a = p.parse_args(argv)
    packages = [x for arg in a.packages for x in arg.split(",") if x]
    try:
        meta = build_task(
            a.out,
            chunk_bytes=a.chunk_bytes,
            packages=packages,
            seed=a.seed,
            val_fraction=a.val_fraction,
            max_per_class=a.max_per_class,
        )
    except XparConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(meta, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
