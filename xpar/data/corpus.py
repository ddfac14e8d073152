"""Corpus discovery and the train/validation split, and loading documents with HF `datasets`.

Default corpus (data.files empty): the running interpreter's standard library .py files,
found under sysconfig's stdlib path with site-packages/dist-packages pruned, so it is the
same on every machine with the same Python version and needs no download.

The split never uses random state. It aims at a validation share within VAL_TOLERANCE of
val_fraction (relative: 2.5%..7.5% of the tokens for 0.05), finest unit last:
- by file, when whole files reach that share (enough files). Files are walked in order
  of a hash of their relative path; a file joins validation when it fits in what is left
  of val_fraction of the bytes (if none fits, the smallest file does).
- otherwise by document, across all files: documents walked in order of a hash of their
  text, each joining validation when it fits in what is left of val_fraction of the
  characters (if none fits, the smallest does).
- when whole documents cannot reach it either (one document, or a few large ones such
  as two .txt files): every document's last val_fraction, cut at a line break.
Each split keeps at least one file or document in train. A corpus too small for any of
these still misses the tolerance; build_data then warns with the share achieved.

Files that are not text (textcheck.py) are found when the token cache is built; a skipped
one (data.skip_bad_files) leaves the corpus as if it had never been listed, split included.
The stdlib corpus is not checked: it is this interpreter's own source.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import stat
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field

from xpar.data import textcheck
from xpar.data.config import DataConfig
from xpar.errors import XparConfigError

TEXT_EXTS = (".txt", ".text", ".md", ".rst", ".py")
JSON_EXTS = (".jsonl", ".json")
PARQUET_EXTS = (".parquet",)
PRUNED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
SPLITS = ("train", "validation")
# Documents per batch handed to the tokenizer.
READ_BATCH = 512
# The validation share is met when |share - val_fraction| <= VAL_TOLERANCE * val_fraction.
# Loose enough for whole files of a small corpus (experiment=tiny's 8 files give 3.1%),
# tight enough to catch one file of two becoming the validation set.
VAL_TOLERANCE = 0.5


def share_ok(share: float, val_fraction: float) -> bool:
    """Whether a validation share (of the tokens) is within tolerance of val_fraction."""
    return abs(share - val_fraction) <= VAL_TOLERANCE * val_fraction


@dataclass(frozen=True)
class CorpusFile:
    path: str  # absolute
    relpath: str  # relative to the corpus root, "/"-separated; what the split hashes
    size: int
    mtime_ns: int
    builder: str  # datasets builder: "text" | "json" | "parquet"


@dataclass
class Corpus:
    """The files of a corpus and how they split; documents are read by `iter_documents`."""

    kind: str  # "stdlib" | "files"
    root: str
    files: list[CorpusFile]
    val_files: list[str] = field(default_factory=list)  # relpaths; empty: split within files
    text_field: str = "text"
    val_fraction: float = 0.05

    @property
    def split_by(self) -> str:
        return "file" if self.val_files else "document"

    def split_files(self, split: str) -> list[CorpusFile]:
        if self.split_by != "file":
            return list(self.files)
        val = set(self.val_files)
        return [f for f in self.files if (f.relpath in val) == (split == "validation")]

    def fingerprint(self) -> dict:
        """Everything that decides the documents of each split (JSON-able, for the cache key)."""
        return {
            "kind": self.kind,
            "root": self.root,
            "files": [[f.relpath, f.size, f.mtime_ns, f.builder] for f in self.files],
            "val_files": sorted(self.val_files),
            "text_field": self.text_field,
            "val_fraction": self.val_fraction,
        }


def unit_hash(salt: str, key: str | bytes) -> float:
    """A hash of `key` mapped to [0, 1); the same on every machine and Python run."""
    data = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else key
    h = hashlib.blake2b(data, digest_size=8, person=salt.encode()[:16])
    return int.from_bytes(h.digest(), "big") / 2.0**64


def discover_corpus(cfg: DataConfig, exclude_dir: str | None = None) -> Corpus:
    """Find the corpus files of `cfg` (sorted, capped by max_files) and split them.

    Files under `exclude_dir` (the cache directory) are skipped, so a cache inside a data
    directory never feeds on itself.
    """
    if cfg.files:
        kind, root, files = "files", *_user_files(cfg.files, exclude_dir)
    else:
        kind, root, files = "stdlib", *_stdlib_files()
    if cfg.max_files and len(files) > cfg.max_files:
        # A stable subset: the files with the lowest hash, so a larger cap only adds files.
        keep = sorted(files, key=lambda f: (unit_hash("subset", f.relpath), f.relpath))
        files = sorted(keep[: cfg.max_files], key=lambda f: f.relpath)
    if not files:
        raise XparConfigError(
            f"data.files={list(cfg.files)!r} is invalid: no non-empty corpus files found; "
            "give .txt/.jsonl/.json/.parquet files"
        )
    val_files = split_by_file(files, cfg.val_fraction)
    return Corpus(
        kind=kind,
        root=root,
        files=files,
        val_files=[f.relpath for f in val_files],
        text_field=cfg.text_field,
        val_fraction=float(cfg.val_fraction),
    )


def not_text_files(corp: Corpus) -> list[tuple[str, str]]:
    """(relpath, why) of each file that is not text; parquet is binary by design and
    `datasets` validates it, the stdlib corpus is trusted. Reads every other file once."""
    if corp.kind == "stdlib":
        return []
    out = []
    for f in corp.files:
        if f.builder != "parquet":
            why = textcheck.not_text(f.path, strict=f.builder == "json")
            if why is not None:
                out.append((f.relpath, why))
    return out


def without(corp: Corpus, relpaths: list[str]) -> Corpus:
    """The corpus as if `relpaths` had never been listed: the split is made again."""
    if not relpaths:
        return corp
    drop = set(relpaths)
    files = [f for f in corp.files if f.relpath not in drop]
    if not files:
        raise XparConfigError(
            f"data.skip_bad_files=true leaves no corpus file: all {len(corp.files)} are not "
            "text; give text, json or parquet files in data.files"
        )
    val = split_by_file(files, corp.val_fraction)
    return dataclasses.replace(corp, files=files, val_files=[f.relpath for f in val])


def split_by_file(files: list[CorpusFile], val_fraction: float) -> list[CorpusFile]:
    """Validation files of a split by whole file; [] when the split goes by document."""
    if len(files) < 2:
        return []
    order = sorted(files, key=lambda f: (unit_hash("split", f.relpath), f.relpath))
    val = [order[i] for i in _fill([f.size for f in order], val_fraction)]
    share = sum(f.size for f in val) / sum(f.size for f in files)
    return val if share_ok(share, val_fraction) else []


def _fill(sizes: list[int], val_fraction: float) -> list[int]:
    """Positions into `sizes` (in hash order) that join validation: each that fits in what
    is left of val_fraction of the total, the smallest when none fits; never all."""
    budget = val_fraction * sum(sizes)
    picked: list[int] = []
    used = 0
    for i, n in enumerate(sizes):
        if len(picked) == len(sizes) - 1:
            break
        if used + n <= budget:
            picked.append(i)
            used += n
    if not picked:
        picked = [min(range(len(sizes)), key=lambda i: sizes[i])]
    return picked


def _stdlib_files() -> tuple[str, list[CorpusFile]]:
    root = os.path.realpath(sysconfig.get_paths()["stdlib"])
    out = []
    for d, dirs, names in os.walk(root):
        # Pruning in place stops the walk from entering anything installed.
        dirs[:] = sorted(x for x in dirs if x not in PRUNED_DIRS and not x.startswith("."))
        for name in names:
            if name.endswith(".py"):
                f = _corpus_file(os.path.join(d, name), root, "text")
                if f is not None:
                    out.append(f)
    out.sort(key=lambda f: f.relpath)
    return root, out


def _builder_for(path: str) -> str | None:
    low = path.lower()
    if low.endswith(TEXT_EXTS):
        return "text"
    if low.endswith(JSON_EXTS):
        return "json"
    if low.endswith(PARQUET_EXTS):
        return "parquet"
    return None


def _user_files(specs, exclude_dir: str | None) -> tuple[str, list[CorpusFile]]:
    supported = ", ".join(TEXT_EXTS + JSON_EXTS + PARQUET_EXTS)
    paths: list[str] = []
    for spec in specs:
        p = os.path.expanduser(spec)
        if glob.has_magic(p):
            matched = sorted(m for m in glob.glob(p, recursive=True) if os.path.isfile(m))
            if not matched:
                raise XparConfigError(
                    f"data.files={list(specs)!r} is invalid: {spec!r} matches no file; check the "
                    "glob and that it is "
                    "relative to the launch directory (or use an absolute path)"
                )
            paths += matched
        elif os.path.isdir(p):
            found = sorted(
                os.path.join(d, n) for d, _, ns in os.walk(p) for n in ns if _builder_for(n)
            )
            if not found:
                raise XparConfigError(
                    f"data.files={list(specs)!r} is invalid: directory {spec!r} has no "
                    f"{supported} file; point data.files at the data files"
                )
            paths += found
        elif os.path.isfile(p):
            paths.append(p)
        else:
            raise XparConfigError(
                f"data.files={list(specs)!r} is invalid: {spec!r} does not exist; give existing "
                "files, directories "
                "or globs (relative to the launch directory)"
            )
    abs_paths = list(dict.fromkeys(os.path.realpath(p) for p in paths))  # dedupe, keep order
    if exclude_dir:
        skip = os.path.realpath(exclude_dir) + os.sep
        abs_paths = [p for p in abs_paths if not p.startswith(skip)]
    if not abs_paths:
        return "", []
    for p in abs_paths:
        if _builder_for(p) is None:
            raise XparConfigError(
                f"data.files={list(specs)!r} is invalid: {p!r} is of an unsupported type; "
                f"use one of {supported}"
            )
    root = os.path.commonpath([os.path.dirname(p) for p in abs_paths])
    files = [f for p in abs_paths if (f := _corpus_file(p, root, _builder_for(p))) is not None]
    files.sort(key=lambda f: f.relpath)
    return root, files


def _corpus_file(path: str, root: str, builder: str) -> CorpusFile | None:
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        return None
    rel = os.path.relpath(path, root).replace(os.sep, "/")
    return CorpusFile(path, rel, st.st_size, st.st_mtime_ns, builder)


# ---------------------------------------------------------------- loading documents


def _datasets():
    """Import HF datasets with every hub access switched off: we only read local files."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if hasattr(datasets.config, name):
            setattr(datasets.config, name, True)
    return datasets


def load_split_datasets(corpus: Corpus, hf_cache_dir: str) -> dict[str, list]:
    """Per split, a list of `datasets.Dataset` with one string column "text"."""
    datasets = _datasets()
    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        out: dict[str, list] = {s: [] for s in SPLITS}
        for builder in ("text", "json", "parquet"):
            data_files = {}
            for split in SPLITS if corpus.split_by == "file" else ("train",):
                fs = [f.path for f in corpus.split_files(split) if f.builder == builder]
                if fs:
                    data_files[split] = fs
            if not data_files:
                continue
            dd = _load(datasets, builder, data_files, corpus.text_field, hf_cache_dir)
            for split, ds in dd.items():
                out[split].append(ds)
        if corpus.split_by == "document":
            out = _split_documents(datasets, out["train"], corpus.val_fraction)
        return out
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def iter_documents(parts: list) -> Iterator[list[str]]:
    """Batches of non-empty document texts, in corpus order."""
    for ds in parts:
        for batch in ds.iter(batch_size=READ_BATCH):
            texts = [t for t in batch["text"] if t]
            if texts:
                yield texts


def _load(datasets, builder: str, data_files: dict, text_field: str, cache_dir: str):
    kwargs: dict = {}
    if builder == "text":
        # One row per file; bytes that are not UTF-8 become U+FFFD instead of failing.
        kwargs = {"sample_by": "document", "encoding_errors": "replace"}
    try:
        dd = datasets.load_dataset(builder, data_files=data_files, cache_dir=cache_dir, **kwargs)
    except Exception as e:  # malformed user files surface as many exception types
        files = [p for fs in data_files.values() for p in fs]
        raise XparConfigError(
            f"data.files: datasets could not load {len(files)} {builder} file(s) "
            f"(first: {files[0]!r}): {type(e).__name__}: {e}; fix or remove the bad file"
        ) from e
    if builder == "text":
        return dd
    out = {}
    for split, ds in dd.items():
        if text_field not in ds.column_names:
            raise XparConfigError(
                f"data.text_field={text_field!r} is not a column of the {builder} files "
                f"(columns: {ds.column_names}); set data.text_field to the text column"
            )
        dtype = getattr(ds.features[text_field], "dtype", None)
        if dtype not in ("string", "large_string"):
            raise XparConfigError(
                f"data.text_field={text_field!r} holds {ds.features[text_field]}, not strings; "
                "set data.text_field to a column of text"
            )
        ds = ds.select_columns([text_field])
        if text_field != "text":
            ds = ds.rename_column(text_field, "text")
        out[split] = ds
    return out


def _split_documents(datasets, parts: list, val_fraction: float) -> dict[str, list]:
    """Split whole documents in order of a hash of their text; one document by position."""
    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    rows, keys, sizes = [], [], []  # non-empty documents only
    row = 0
    for batch in ds.iter(batch_size=READ_BATCH):
        for t in batch["text"]:
            if t:
                rows.append(row)
                keys.append((unit_hash("doc", t), row))
                sizes.append(len(t) + 1)  # + the end-of-document token
            row += 1
    order = sorted(range(len(rows)), key=lambda k: keys[k])
    picked = {order[p] for p in _fill([sizes[k] for k in order], val_fraction)} if rows else ()
    share = sum(sizes[k] for k in picked) / max(sum(sizes), 1)
    if len(rows) == 1 or (rows and not share_ok(share, val_fraction)):
        # Whole documents cannot reach the share (one, or a few large ones): every
        # document gives validation its last val_fraction instead.
        return _cut_documents(datasets, [ds[r]["text"] for r in rows], val_fraction)
    val_idx = [r for k, r in enumerate(rows) if k in picked]  # corpus order kept
    train_idx = [r for k, r in enumerate(rows) if k not in picked]
    return {"train": [ds.select(train_idx)], "validation": [ds.select(val_idx)]}


def _cut_documents(datasets, texts: list[str], val_fraction: float) -> dict[str, list]:
    """The last val_fraction of each document is validation, starting on a fresh line
    unless the next line break is so far that the share would drop out of tolerance."""
    train, val = [], []
    for text in texts:
        cut = int(len(text) * (1.0 - val_fraction))
        limit = int(len(text) * (1.0 - val_fraction * (1.0 - VAL_TOLERANCE / 2)))
        nl = text.find("\n", cut, limit)
        if nl != -1:
            cut = nl + 1
        cut = cut or len(text)  # a document too short to cut stays in train
        train.append(text[:cut])
        val.append(text[cut:])
    keep = [i for i, t in enumerate(val) if t]
    return {
        "train": [datasets.Dataset.from_dict({"text": [t for t in train if t]})],
        "validation": [datasets.Dataset.from_dict({"text": [val[i] for i in keep]})],
    }
