"""build_data: the one entry point of the data pipeline.

Cheap to call on every rank, concurrently, before or without torch.distributed: the token
cache is built once (file lock + atomic rename, see cache.py) and then memory-mapped.
Rank 0 warns when the validation share misses val_fraction (see corpus.py for the rule).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from xpar.config.store import XparConfigWarning
from xpar.data import cache, corpus, packing, textcheck
from xpar.data.config import DataConfig
from xpar.data.loader import Batch, TrainLoader, ValLoader, check_shard
from xpar.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer
from xpar.errors import XparConfigError

log = logging.getLogger(__name__)

# Bump when the cached stream format or the document/split rules change.
# 4: files that are not text are refused or skipped (a version-3 cache may hold one).
CACHE_VERSION = 4


@dataclass
class SplitStats:
    files: int  # 0 when the split is made within files
    docs: int
    tokens: int  # including one eod per document
    blocks: int  # of seq_len + 1 tokens


@dataclass
class DataStats:
    corpus: str  # "stdlib" | "files"
    split_by: str  # "file" | "document"
    train: SplitStats
    validation: SplitStats
    vocab_size: int
    cache_dir: str
    cache_hit: bool
    build_s: float  # time spent building the cache when it was built (by whoever built it)
    load_s: float  # time this call took
    val_fraction: float  # asked for
    val_share: float  # validation tokens / all tokens: what the split achieved

    @property
    def val_share_ok(self) -> bool:
        return corpus.share_ok(self.val_share, self.val_fraction)

    def summary(self) -> str:
        """The split, each side's size and the validation share against its target."""
        t, v = self.train, self.validation
        missed = "" if self.val_share_ok else ", missed"
        return (
            f"{self.corpus} corpus split by {self.split_by}; train {t.docs} docs "
            f"{t.tokens:,} tokens {t.blocks:,} blocks; val {v.docs} docs {v.tokens:,} tokens; "
            f"val share {_pct(self.val_share)} (target {_pct(self.val_fraction)} "
            f"±{_pct(corpus.VAL_TOLERANCE * self.val_fraction)}{missed})"
        )

    def to_dict(self) -> dict:
        return asdict(self)


def describe_cache(build_s: Sequence[float | None]) -> str:
    """Who built the token cache: build_s[r] is rank r's build time, None where it loaded."""
    built = [(r, s) for r, s in enumerate(build_s) if s is not None]
    if not built:
        return "cache hit" + (" (all ranks)" if len(build_s) > 1 else "")
    if len(built) == 1:
        return f"cache built by rank {built[0][0]} in {built[0][1]:.1f}s"
    # Several builders: ranks on nodes that do not share data.cache_dir.
    ranks = ", ".join(str(r) for r, _ in built[:4]) + (", ..." if len(built) > 4 else "")
    slowest = max(s for _, s in built)
    return f"cache built by {len(built)} ranks ({ranks}) in up to {slowest:.1f}s"


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"


@dataclass
class DataBundle:
    tokenizer: ByteTokenizer | HFTokenizer
    train: TrainLoader
    val: ValLoader
    stats: DataStats

    def val_batches(self, n: int) -> list[Batch]:
        return self.val.batches(n)


def build_data(
    cfg: DataConfig, rank: int = 0, world_size: int = 1, micro_batch_size: int = 8
) -> DataBundle:
    """Tokenizer, this rank's train and val loaders, and corpus statistics for `cfg`."""
    t0 = time.perf_counter()
    cfg.validate()
    check_shard(rank, world_size, micro_batch_size)
    tok = build_tokenizer(cfg.tokenizer)
    root = os.path.abspath(os.path.expanduser(cfg.cache_dir or cache.default_cache_dir()))
    corp = corpus.discover_corpus(cfg, exclude_dir=root)
    directory, meta, hit = _token_cache(corp, tok, root, cfg)
    # Whoever built the cache found the files that are not text; every rank drops them.
    skipped = meta.get("skipped", [])
    corp = corpus.without(corp, [rel for rel, _ in skipped])
    if rank == 0 and skipped:
        warnings.warn(_skipped_files(corp.root, skipped), XparConfigWarning, stacklevel=2)
    blocks, split_stats = _blocks(cfg, corp, directory, meta)
    train = TrainLoader(
        blocks["train"],
        rank=rank,
        world_size=world_size,
        micro_batch_size=micro_batch_size,
        seed=cfg.seed,
        shuffle=cfg.shuffle,
    )
    val = ValLoader(
        blocks["validation"], rank=rank, world_size=world_size, micro_batch_size=micro_batch_size
    )
    stats = DataStats(
        corpus=corp.kind,
        split_by=corp.split_by,
        train=split_stats["train"],
        validation=split_stats["validation"],
        vocab_size=tok.vocab_size,
        cache_dir=directory,
        cache_hit=hit,
        build_s=float(meta.get("build_s", 0.0)),
        load_s=round(time.perf_counter() - t0, 3),
        val_fraction=float(cfg.val_fraction),
        val_share=split_stats["validation"].tokens
        / (split_stats["train"].tokens + split_stats["validation"].tokens),
    )
    if rank == 0 and not stats.val_share_ok:
        warnings.warn(_missed_share(stats, len(corp.files)), XparConfigWarning, stacklevel=2)
    return DataBundle(tokenizer=tok, train=train, val=val, stats=stats)


def _token_cache(corp, tok, root: str, cfg: DataConfig) -> tuple[str, dict, bool]:
    """The token streams of both splits, built once (under a file lock) or found cached.

    The key is the corpus as listed plus skip_bad_files: a cache that skipped a file is
    never reused by a run that must refuse it. meta["skipped"] lists what was skipped."""
    key = cache.cache_key(
        {
            "version": CACHE_VERSION,
            "corpus": corp.fingerprint(),
            "tokenizer": tok.fingerprint,
            "skip_bad_files": cfg.skip_bad_files,
        }
    )

    def build(tmp: str) -> dict:
        t_load = time.perf_counter()
        skipped = _check_text(corp, cfg)
        use = corpus.without(corp, [rel for rel, _ in skipped])
        parts = corpus.load_split_datasets(use, os.path.join(root, "hf"))
        t_tok = time.perf_counter()
        meta: dict = {"tokenizer": tok.fingerprint, "corpus": use.fingerprint(), "splits": {}}
        meta["skipped"] = [list(s) for s in skipped]
        for split, dsets in parts.items():
            info = packing.write_token_stream(
                corpus.iter_documents(dsets), tok, os.path.join(tmp, split + ".bin")
            )
            meta["splits"][split] = info
        meta["load_s"] = round(t_tok - t_load, 3)
        meta["tokenize_s"] = round(time.perf_counter() - t_tok, 3)
        return meta

    directory, meta, hit = cache.build_or_load(os.path.join(root, "tokens"), key, build)
    if not hit:
        # Debug only: the trainer's data line says once which rank built it (rank 0 speaks).
        log.debug(
            "data: built token cache %s in %.1fs (load %.1fs, tokenize %.1fs)",
            directory,
            meta["build_s"],
            meta["load_s"],
            meta["tokenize_s"],
        )
    return directory, meta, hit


def _check_text(corp, cfg: DataConfig) -> list[tuple[str, str]]:
    """The files to skip; a config error naming them unless data.skip_bad_files."""
    bad = corpus.not_text_files(corp)
    if bad and not cfg.skip_bad_files:
        one = len(bad) == 1
        raise XparConfigError(
            f"data.files={list(cfg.files)!r} is invalid: {len(bad)} file(s) not text: "
            f"{_name_files(corp.root, bad)}; remove {'it' if one else 'them'} from data.files "
            f"(or convert {'it' if one else 'them'} to UTF-8), or set data.skip_bad_files=true "
            "to skip files that are not text (a NUL byte, or over "
            f"{100 * textcheck.BAD_SHARE:g}% of the bytes not UTF-8)"
        )
    return bad


def _skipped_files(root: str, skipped: list) -> str:
    return (
        f"data.skip_bad_files=true: skipped {len(skipped)} file(s) that are not text: "
        f"{_name_files(root, skipped)}"
    )


def _name_files(root: str, bad: list, limit: int = 3) -> str:
    """The first `limit` files as 'path (why)', and how many more."""
    names = [f"{os.path.join(root, rel)!r} ({why})" for rel, why in bad[:limit]]
    more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
    return ", ".join(names) + more


def _blocks(
    cfg: DataConfig, corp, directory: str, meta: dict
) -> tuple[dict[str, np.ndarray], dict[str, SplitStats]]:
    """Each split's stream as seq_len + 1 blocks, and its statistics; an empty split is a
    config error."""
    blocks: dict[str, np.ndarray] = {}
    split_stats: dict[str, SplitStats] = {}
    for split in corpus.SPLITS:
        info = meta["splits"][split]
        stream = packing.read_token_stream(
            os.path.join(directory, split + ".bin"), info["dtype"], info["tokens"]
        )
        blocks[split] = packing.blocks_view(stream, cfg.seq_len)
        n_files = len(corp.split_files(split)) if corp.split_by == "file" else 0
        split_stats[split] = SplitStats(n_files, info["docs"], info["tokens"], len(blocks[split]))
        if len(blocks[split]) == 0:
            raise XparConfigError(
                f"data.seq_len={cfg.seq_len} leaves no {split} block: the {split} split of "
                f"data.files={list(cfg.files)!r} (max_files={cfg.max_files}) has "
                f"{info['tokens']} tokens, fewer than seq_len + 1; add data "
                "(more or larger files, data.max_files=0) or lower data.seq_len"
            )
    return blocks, split_stats


def _missed_share(st: DataStats, n_files: int) -> str:
    by_file = st.split_by == "file"
    held = f"{st.validation.files} of {n_files} files" if by_file else "cut from every document"
    why = "whole files cannot do better" if by_file else "the documents are too short to cut closer"
    lo, hi = ((1 - s * corpus.VAL_TOLERANCE) * st.val_fraction for s in (1, -1))
    return (
        f"data.val_fraction={st.val_fraction:g} not met: validation is {_pct(st.val_share)} "
        f"of the tokens ({held}), outside {_pct(lo)}..{_pct(hi)}; {why}; add more text, "
        f"or set data.val_fraction={st.val_share:.2g}"
    )
